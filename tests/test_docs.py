"""The docs cannot drift from the code: docs/spec.md's key table against the pydantic models
(both directions, with defaults), and every YAML spec in the docs parses."""

from __future__ import annotations

import importlib.util
import re
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from lorasweep.spec import SweepSpec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SPEC_DOC = DOCS / "spec.md"


def _gen():
    spec = importlib.util.spec_from_file_location(
        "gen_spec_docs", ROOT / "scripts/gen_spec_docs.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def doc_table() -> dict[str, dict[str, str]]:
    """{key: {"type", "default", "meaning"}} from the rows of docs/spec.md's key table."""
    text = SPEC_DOC.read_text(encoding="utf-8")
    start, end = text.index("<!-- spec-table:start"), text.index("<!-- spec-table:end -->")
    rows = {}
    for line in text[start:end].splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        key, type_, default, meaning = cells
        key = key.strip("`")
        assert key not in rows, f"docs/spec.md: key {key} is listed twice"
        rows[key] = {"type": type_, "default": default.strip("`"), "meaning": meaning}
    return rows


def _members(tp: typing.Any) -> list[typing.Any]:
    return (
        list(typing.get_args(tp))
        if typing.get_origin(tp) in (typing.Union, type(int | None))
        else [tp]
    )


def model_paths(
    model: type[BaseModel] = SweepSpec, prefix: str = "", seen: set | None = None
) -> set[str]:
    """Every key path of the spec, independently of the generator: nested models recursed;
    a dict of models (``variants``) is ``variants.<name>``, its keys those of the same model
    documented at its first path (``lora``)."""
    seen = set() if seen is None else seen
    seen.add(model)
    out = set()
    for name, field in model.model_fields.items():
        path = prefix + name
        sub = None
        for t in _members(field.annotation):
            if isinstance(t, type) and issubclass(t, BaseModel):
                sub = t
            elif typing.get_origin(t) is dict:
                value = typing.get_args(t)[1]
                if isinstance(value, type) and issubclass(value, BaseModel):
                    path += ".<name>"
                    sub = value
        out.add(path)
        if sub is not None and sub not in seen:
            out |= model_paths(sub, path + ".", seen)
            if sub.model_config.get("extra") == "allow":  # grid: any setting is a key
                out.add(path + ".<setting>")
    return out


def test_every_spec_key_is_documented_and_every_documented_key_exists() -> None:
    documented = set(doc_table())
    actual = model_paths()
    missing = sorted(actual - documented)
    stale = sorted(documented - actual)
    fix = " (run: python scripts/gen_spec_docs.py)"
    assert not missing, f"keys of spec.py missing from docs/spec.md: {missing}{fix}"
    assert not stale, f"keys in docs/spec.md that spec.py does not have: {stale}{fix}"
    # spot checks of the walk itself
    assert {"dataset.max_length", "lora.alpha", "grid.rank", "variants.<name>"} <= actual
    assert {"grid.<setting>", "search.space", "tune"} <= actual


def test_documented_defaults_and_types_match_the_models() -> None:
    gen = _gen()
    table = doc_table()
    for row in gen.rows():
        doc = table[row["key"]]
        assert doc["default"] == row["default"], f"{row['key']}: default in docs/spec.md"
        assert doc["type"] == row["type"], f"{row['key']}: type in docs/spec.md"
    # defaults read from a real parse, not only from the generator
    spec = parse_spec({"task": "classification", "model": "m", "dataset": {"source": "x.csv"}})
    assert table["seeds"]["default"] == "[0]" and spec.seeds == [0]
    assert table["dataset.max_length"]["default"] == str(spec.dataset.max_length)
    assert table["grid.rank"]["default"] == "[8]" and spec.grid.rank == [8]


def test_every_key_has_a_meaning() -> None:
    empty = [k for k, v in doc_table().items() if not v["meaning"]]
    assert not empty, f"docs/spec.md keys without a meaning: {empty}"


def test_spec_doc_is_what_the_generator_writes() -> None:
    gen = _gen()
    text = SPEC_DOC.read_text(encoding="utf-8")
    assert gen.render(text) == text, "docs/spec.md is out of date: python scripts/gen_spec_docs.py"


def _yaml_blocks(path: Path) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.parametrize("doc", ["spec.md", "quickstart.md"])
def test_yaml_specs_in_the_docs_parse(doc: str) -> None:
    blocks = [b for b in _yaml_blocks(DOCS / doc) if re.search(r"^task:", b, flags=re.M)]
    assert blocks, f"docs/{doc} has no spec example"
    for block in blocks:
        parse_spec(yaml.safe_load(block))


def test_the_docs_link_each_other() -> None:
    for name in ("quickstart.md", "spec.md", "report.md"):
        assert (DOCS / name).exists(), name
    quick = (DOCS / "quickstart.md").read_text(encoding="utf-8")
    for target in ("spec.md", "report.md", "scaling.md"):
        assert f"({target}" in quick, f"quickstart.md does not link {target}"
