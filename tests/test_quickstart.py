"""docs/quickstart.md's notebook section runs as written.

Its Python blocks are run in order, as notebook cells, in a fresh Python process, in a folder
holding a ``sweep.yaml`` for the tiny BERT (the only thing that differs from a reader's
folder). The run folder it names, ``runs/my-sweep``, is trained here first, in this process,
so the quickstart's ``sweep.run(...)`` resumes it (nothing left to train) rather than training
in the budget: 60 CPU seconds (about 25 on an idle 2-core machine; CPU time, so that a busy
machine does not fail it; a wall-clock limit of 5 minutes stops a hung run). Like Jupyter,
each block's last expression is displayed: its ``_repr_html_`` (or a Figure's
``_repr_png_``) is called and must give something.
"""

from __future__ import annotations

import ast
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_classification_spec

from lorasweep.api import Sweep

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "docs" / "quickstart.md"
BUDGET_CPU_S = 60
WALL_LIMIT_S = 300

# Runs the blocks as cells: every statement, then the last expression is "displayed" the way
# Jupyter does (rich reprs first). Prints one JSON record per block.
RUNNER = r"""
import ast, json, sys
import matplotlib
matplotlib.use("Agg")

def display(value):
    shown = {"type": type(value).__name__, "html": None, "png": 0}
    if hasattr(value, "_repr_html_"):
        shown["html"] = value._repr_html_()
    if hasattr(value, "_repr_png_"):
        shown["png"] = len(value._repr_png_() or b"")
    shown["text"] = repr(value)[:2000]
    return shown

ns = {"__name__": "__main__", "display": display}
records = []
for i, block in enumerate(json.load(open(sys.argv[1]))):
    tree = ast.parse(block)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, f"<quickstart block {i + 1}>", "exec"), ns)
    value = None
    if last is not None:
        value = eval(compile(ast.Expression(last.value), f"<quickstart block {i + 1}>", "eval"), ns)
    records.append(display(value) if value is not None else None)
print("RECORDS " + json.dumps(records))
"""


def _children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def python_blocks(path: Path = QUICKSTART) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), re.S | re.M)


def test_each_block_shows_only_its_last_value() -> None:
    """A cell shows its last value only: an expression before it would be lost (the figures
    the old quickstart drew four to a line), unless it is printed or displayed."""
    blocks = python_blocks()
    assert len(blocks) >= 5
    for block in blocks:
        body = ast.parse(block).body
        for stmt in body[:-1]:
            if isinstance(stmt, ast.Expr):
                call = stmt.value
                name = getattr(getattr(call, "func", None), "id", None)
                assert name in ("print", "display"), f"not shown: {ast.unparse(stmt)}"
        assert isinstance(body[-1], ast.Expr), f"block shows nothing: {block}"


@pytest.fixture
def reader_folder(tiny_bert_dir: Path, tiny_csv: Path, tmp_path: Path) -> Path:
    """A reader's folder: sweep.yaml (the tiny model) and runs/my-sweep, already run."""
    spec = tiny_classification_spec(tiny_bert_dir, tiny_csv, name="my-sweep")
    spec["training"]["max_steps"] = 2
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    Sweep.from_spec(tmp_path / "sweep.yaml").run(
        tmp_path / "runs" / "my-sweep", backend="inprocess", quiet=True, report=False
    )
    return tmp_path


def test_the_quickstart_runs_as_written(reader_folder: Path) -> None:
    blocks = python_blocks()
    (reader_folder / "blocks.json").write_text(json.dumps(blocks))
    (reader_folder / "runner.py").write_text(RUNNER)
    env = {**os.environ, "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    before = _children_cpu()
    out = subprocess.run(
        [sys.executable, "runner.py", "blocks.json"],
        cwd=reader_folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=WALL_LIMIT_S,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    cpu = _children_cpu() - before
    assert cpu < BUDGET_CPU_S, f"the quickstart took {cpu:.0f} CPU seconds (trained again?)"
    line = next(x for x in out.stdout.splitlines() if x.startswith("RECORDS "))
    shown = json.loads(line.removeprefix("RECORDS "))
    assert len(shown) == len(blocks) and all(shown), shown
    by_type: dict[str, list[dict]] = {}
    for record in shown:
        by_type.setdefault(record["type"], []).append(record)
        assert record["html"] or record["png"] or record["type"] == "PosixPath", record

    # the run folder: its status, the table and the card
    (results,) = by_type["Results"][:1]
    assert "4 complete" in results["html"] and "lorasweep-recommendation" in results["html"]
    assert "<table" in by_type["DataFrame"][0]["html"]
    # the analysis: a row per configuration, the card; its text is the CLI's
    (analysis,) = by_type["Analysis"]
    assert analysis["html"].count("<tr") >= 3 and "lora r=2" in analysis["html"]
    assert analysis["text"].startswith("accuracy (higher is better); margin 0.005")
    # the recommendation card, found or not
    (rec,) = by_type["Recommendation"]
    assert "lorasweep-recommendation" in rec["html"]
    assert "Recommended: lora r=" in rec["html"] or "No recommendation" in rec["html"]
    # one figure, then four together
    assert by_type["Figure"][0]["png"] > 1000
    (figures,) = by_type["Figures"]
    assert figures["html"].count("<img") == 4
    assert (reader_folder / "runs" / "my-sweep" / "report.html").exists()
    assert out.stdout.count("\n") >= 2  # the two print() lines of the recommendation block
    print(f"quickstart: {cpu:.1f} CPU seconds")
