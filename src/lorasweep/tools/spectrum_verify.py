"""Test a spectrum suggestion instead of trusting it: add it to a sweep as extra variants.

``lorasweep spectrum ADAPTER --verify RUN_DIR`` (or :func:`verify_suggestion`) reads the
suggestion of a trained (pilot) adapter, turns it into spec variants, writes the extended spec
to ``RUN_DIR/spec.verify.yaml`` and runs it into the same run folder. Every trial id hashes its
fully resolved config, so the trials already in the store are skipped and only the new variants
train, with the spec's seeds. The report then shows them in the statistics table next to the
grid, and the spectrum section marks them (the records stored in the run's ``meta["verify"]``
are read back by ``analysis.verify_summary``).

Two variants, each added only when it would train something new:

- ``suggested-r<k>``: ``{rank: k}``, the smallest uniform rank keeping ``energy`` of every
  module's update. Skipped when k is already a rank of the pilot's variant grid.
- ``suggested-pattern``: ``{rank_pattern: {...}}``, one rank per group (or per module type).
  Skipped when every module gets the same rank (it would repeat ``suggested-r<k>``).

The spec's ``rank_pattern`` takes group names (attention, mlp) or module-name *suffixes*, not
the peft regex keys of ``spectrum.suggest`` (``\\d+\\.output\\.dense``). So the keys are rebuilt
here against the model (built on the meta device from its config, no weights): group names when
the pilot targeted whole groups, else the shortest suffix of each module type, else full module
names; every candidate is checked to give exactly the pilot's modules their suggested ranks.
Both variants target the pilot's modules, so only the rank differs from the pilot.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from lorasweep.plan import merge_adapter
from lorasweep.spec import ADALORA_KEYS, AdapterSpec, SweepSpec, parse_spec
from lorasweep.store import open_store

SPEC_FILE = "spec.verify.yaml"
UNIFORM_PREFIX = "suggested-r"
PATTERN_NAME = "suggested-pattern"
# Settings of the pilot's variant that the suggested variants must not inherit.
_RANK_KEYS = ("rank", "rank_pattern", "alpha_pattern", "target_modules", *ADALORA_KEYS)


def _strip_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_strip_none(v) for v in obj]
    return obj


def run_spec_dict(run_dir: str | Path) -> dict[str, Any]:
    """The spec of the last sweep run into ``run_dir``, as a plain dict (defaults left out)."""
    with open_store(run_dir) as store:
        meta = store.meta()
    if meta.get("spec_yaml"):
        data = yaml.safe_load(meta["spec_yaml"])
    elif meta.get("spec"):
        data = _strip_none(meta["spec"])
    else:
        raise ValueError(f"RUN_DIR: {run_dir} has no recorded spec (was it made by run_sweep?)")
    if not isinstance(data, dict):
        raise ValueError(f"RUN_DIR: the spec recorded in {run_dir} is not a mapping")
    return data


def _pilot_trial(run_dir: Path, adapter_dir: Path) -> dict[str, Any] | None:
    """The stored trial that saved ``adapter_dir``, if it belongs to this run."""
    want = adapter_dir.resolve()
    with open_store(run_dir) as store:
        for t in store.trials():
            d = t["artifacts"].get("adapter_dir")
            # stored relative to the run folder (older runs: to the working directory)
            if d and want in ((run_dir / d).resolve(), Path(d).resolve()):
                return t
    return None


def _meta_model(spec: SweepSpec) -> Any:
    from lorasweep.training import models
    from lorasweep.training.targets import build_meta_model

    return build_meta_model(models.load_config(spec.model), spec.task, num_labels=2)


def _selects(meta: Any, keys: Mapping[str, int]) -> dict[str, int] | None:
    """Module -> rank that the spec's rank_pattern ``keys`` gives (None if a key matches
    nothing), with the precedence of ``targets.rank_pattern_for_groups``."""
    from lorasweep.training.targets import partition

    try:
        return {n: int(r) for n, r in partition(meta, dict(keys)).items()}
    except ValueError:
        return None


def spec_rank_pattern(
    meta: Any,
    intended: Mapping[str, int],
    by: str = "group",
    groups: Mapping[str, str] | None = None,
) -> dict[str, int]:
    """Spec ``rank_pattern`` keys (groups or suffixes) that give exactly the modules of
    ``intended`` (full module names -> rank) their rank, and target no other module.

    Tries, in order: group names (``by="group"``: ``groups`` maps module -> group), the shortest
    suffix of each module type (suffixes that match more than their type go first, so the exact
    ones after them win), and the full module names, which always work.
    """
    from lorasweep.tools.spectrum import module_type
    from lorasweep.training.targets import linear_module_names, suffix_matches

    intended = {n: int(r) for n, r in intended.items()}
    candidates: list[dict[str, int]] = []
    if by == "group" and groups:
        by_group: dict[str, int] = {}
        for n, r in intended.items():
            by_group[groups[n]] = max(by_group.get(groups[n], 0), r)
        candidates.append(by_group)
    linear = linear_module_names(meta)
    types: dict[str, list[str]] = {}
    for n in intended:
        types.setdefault(module_type(n), []).append(n)
    loose, exact = {}, {}
    for mtype, members in types.items():
        rank = max(intended[n] for n in members)
        parts = mtype.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if set(suffix_matches(linear, suffix)) == set(members):
                exact[suffix] = rank
                break
        else:
            loose[mtype] = rank
    candidates.append({**dict(sorted(loose.items(), key=lambda kv: kv[0].count("."))), **exact})
    for cand in candidates:
        if _selects(meta, cand) == intended:
            return cand
    return dict(intended)


def _targets_of(meta: Any, adapter: Mapping[str, Any]) -> set[str] | None:
    """Modules a (merged) variant targets; None when it cannot be told (AdaLoRA defaults...)."""
    from lorasweep.training.targets import resolve_targets

    if adapter.get("rank_pattern"):
        got = _selects(meta, adapter["rank_pattern"])
        return set(got) if got is not None else None
    try:
        return set(resolve_targets(meta, adapter.get("target_modules") or "default").modules)
    except ValueError:
        return None


def _unique_name(variants: Mapping[str, Any], name: str, settings: dict[str, Any]) -> str:
    """``name``, or ``name-2``... when a different variant already has it."""
    candidate, n = name, 1
    while candidate in variants and _plain(variants[candidate]) != settings:
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def _plain(v: Any) -> dict[str, Any]:
    if isinstance(v, AdapterSpec):
        return v.model_dump(mode="json", exclude_none=True, exclude_unset=True)
    return _strip_none(dict(v or {}))


def build_verify_spec(
    spec_dict: Mapping[str, Any],
    analysis: Mapping[str, Any],
    pilot_variant: str | None = None,
    by: str = "group",
) -> dict[str, Any]:
    """The spec extended with the suggestion's variants, and what was added or skipped.

    Args:
        spec_dict: the run's spec as a dict (see :func:`run_spec_dict`).
        analysis: ``spectrum.analyze_adapter`` output of the pilot adapter (``modules``,
            ``suggestion``).
        pilot_variant: the spec variant the pilot adapter was trained as (its base settings,
            alpha policy, dropout, training overrides... are kept); None for the default.

    Returns:
        ``spec`` (the new spec dict), ``added`` {variant name: settings}, ``notes`` (one line
        per decision) and ``intended`` {module: rank} of the pattern.
    """
    spec = parse_spec(copy.deepcopy(dict(spec_dict)))
    sug = analysis["suggestion"]
    data = copy.deepcopy(dict(spec_dict))
    variants: dict[str, Any] = dict(data.get("variants") or {})
    notes: list[str] = []
    if not variants:
        # the implicit default variant, made explicit: same name, same resolved config, same ids
        variants = {"lora": {}}
    base_name = pilot_variant if pilot_variant in variants else next(iter(variants))
    if pilot_variant is not None and pilot_variant not in variants:
        notes.append(
            f"the pilot's variant {pilot_variant!r} is not in the spec; based on {base_name!r}"
        )
    base_own = _plain(variants[base_name])
    base = merge_adapter(spec.lora, AdapterSpec.model_validate(base_own))
    meta = _meta_model(spec)
    intended, groups = _intended_ranks(meta, analysis, by, spec.model, notes)
    pattern = spec_rank_pattern(meta, intended, by=by, groups=groups)

    own = {k: v for k, v in base_own.items() if k not in _RANK_KEYS}
    if base.get("method") == "adalora":
        own["method"] = "lora"
        notes.append("the pilot is AdaLoRA: the suggested variants use method lora")
    added: dict[str, dict[str, Any]] = {}
    k = int(sug["variant"]["rank"])
    same_targets = _targets_of(meta, base) == set(intended)  # the pilot's modules
    in_grid = (
        not base.get("rank")
        and not base.get("rank_pattern")
        and base.get("method", "lora") != "adalora"
        and k in spec.grid.rank
    )
    if in_grid and same_targets:
        notes.append(
            f"rank {k} is already in the grid of variant {base_name!r}: no "
            f"{UNIFORM_PREFIX}{k} variant, compare {base_name}/r={k}"
        )
    else:
        uniform = {**own, "rank": k}
        if not same_targets:  # the pilot's modules, not the variant's (another adapter?)
            uniform["target_modules"] = list(pattern)
        elif "target_modules" in base_own:
            uniform["target_modules"] = base_own["target_modules"]
        added[f"{UNIFORM_PREFIX}{k}"] = uniform
    if len(set(intended.values())) == 1:
        notes.append(
            f"every module gets rank {k}: the pattern is the uniform rank, no "
            f"{PATTERN_NAME} variant"
        )
    else:
        added[PATTERN_NAME] = {**own, "rank_pattern": pattern}

    final = _add_variants(variants, added, notes)
    data["variants"] = variants
    return {
        "spec": data,
        "added": final,
        "notes": notes,
        "intended": intended,
        "base_variant": base_name,
    }


def _add_variants(
    variants: dict[str, Any], added: Mapping[str, dict[str, Any]], notes: list[str]
) -> dict[str, dict[str, Any]]:
    """Put ``added`` into ``variants`` under names no different variant has; the names used."""
    final: dict[str, dict[str, Any]] = {}
    for name, settings in added.items():
        name = _unique_name(variants, name, settings)
        if name in variants:
            notes.append(f"variant {name!r} is already in the spec: its trials are reused")
        variants[name] = settings
        final[name] = settings
    return final


def _intended_ranks(
    meta: Any, analysis: Mapping[str, Any], by: str, model: str, notes: list[str]
) -> tuple[dict[str, int], dict[str, str]]:
    """Module -> suggested rank (per group or per type) and module -> group, for the adapter's
    modules that are trainable linear layers of the model (the others get a note)."""
    from lorasweep.training.targets import linear_module_names

    linear = set(linear_module_names(meta))
    sug = analysis["suggestion"]
    key = "group_ranks" if by == "group" else "type_ranks"
    field = "group" if by == "group" else "type"
    intended, groups = {}, {}
    for m in analysis["modules"]:
        if m["name"] not in linear:
            notes.append(f"{m['name']}: not a trainable linear layer of {model}; left out")
            continue
        intended[m["name"]] = int(sug[key][m[field]])
        groups[m["name"]] = m["group"]
    if not intended:
        raise ValueError(
            f"no module of the adapter is a linear layer of {model}: was it "
            "trained on another model?"
        )
    return intended, groups


def verify_suggestion(
    run_dir: str | Path,
    adapter_dir: str | Path,
    energy: float = 0.9,
    by: str = "group",
    run: bool = True,
    backend: str = "local",
    quiet: bool = False,
    power_of_two: bool = False,
) -> dict[str, Any]:
    """Add the suggestion of ``adapter_dir`` to the sweep in ``run_dir`` and (``run``) train it.

    Returns:
        ``suggestion`` (``spectrum.suggest`` output), ``variants`` (the variants added, name ->
        settings), ``notes``, ``spec_path``, ``new_trial_ids`` (trials of the added variants),
        ``reused_trial_ids`` (planned trials the store already had) and, when run,
        ``outcome`` (planned, ran, skipped, statuses, report).

    Raises:
        ValueError: the run folder has no spec, or the new spec would change existing trial ids.
        SpecError: the extended spec does not validate.
    """
    from lorasweep.tools.spectrum import analyze_adapter

    run_dir, adapter_dir = Path(run_dir), Path(adapter_dir)
    analysis = analyze_adapter(adapter_dir, energy=energy, by=by, power_of_two=power_of_two)
    old = run_spec_dict(run_dir)
    pilot = _pilot_trial(run_dir, adapter_dir)
    built = build_verify_spec(old, analysis, pilot["variant"] if pilot else None, by=by)
    new_spec = parse_spec(built["spec"])
    old_ids = {t.id for t in parse_spec(old).trials()}
    planned = new_spec.trials()
    new_ids = {t.id for t in planned}
    if not old_ids <= new_ids:  # never re-train the sweep under new ids
        raise ValueError("the extended spec changes the ids of the existing trials; not run")
    spec_path = run_dir / SPEC_FILE
    spec_path.write_text(
        "# written by lorasweep spectrum --verify: the sweep plus the suggested variants\n"
        + yaml.safe_dump(built["spec"], sort_keys=False)
    )
    with open_store(run_dir) as store:
        stored = {t["id"] for t in store.trials()}
        record = {
            "adapter": str(adapter_dir),
            "pilot": pilot["label"] if pilot else adapter_dir.name,
            "energy": energy,
            "by": by,
            "suggested_rank": analysis["suggestion"]["suggested_rank"],
            "group_ranks": analysis["suggestion"]["group_ranks"],
            "variants": built["added"],
            "base_variant": built["base_variant"],
            "notes": built["notes"],
        }
        same = ("adapter", "variants")
        history = [
            r for r in store.meta().get("verify", []) if any(r.get(k) != record[k] for k in same)
        ]
        store.set_meta(verify=[*history, record])
    added = set(built["added"])
    out: dict[str, Any] = {
        "suggestion": analysis["suggestion"],
        "variants": built["added"],
        "notes": built["notes"],
        "spec_path": str(spec_path),
        "new_trial_ids": [t.id for t in planned if t.variant in added and t.id not in stored],
        "reused_trial_ids": [t.id for t in planned if t.id in stored],
    }
    if run:
        from lorasweep.run.sweep import run_sweep

        outcome = run_sweep(new_spec, run_dir, backend=backend, quiet=quiet)
        out["outcome"] = {
            "planned": outcome.planned,
            "ran": outcome.ran,
            "skipped": outcome.skipped,
            "statuses": outcome.statuses,
            "report": str(outcome.report) if outcome.report else None,
        }
    return out


def format_verify(result: Mapping[str, Any]) -> str:
    """The human summary of :func:`verify_suggestion`."""
    lines = []
    if result["variants"]:
        lines.append("Added to the sweep:")
        for name, settings in result["variants"].items():
            lines.append(f"  {name}: {json.dumps(settings)}")
    else:
        lines.append("Nothing new to add: the suggestion is already in the sweep.")
    lines += [f"  note: {n}" for n in result["notes"]]
    lines.append(f"Spec: {result['spec_path']}")
    o = result.get("outcome")
    if o:
        st = ", ".join(f"{n} {s}" for s, n in sorted(o["statuses"].items()))
        lines.append(
            f"{o['planned']} trials planned: ran {o['ran']} now, {o['skipped']} already "
            f"recorded ({st})."
        )
        if o.get("report"):
            lines.append(f"Report: {o['report']}")
    else:
        lines.append(
            f"{len(result['new_trial_ids'])} new trials; run them with: lorasweep run "
            f"{result['spec_path']} --out {Path(result['spec_path']).parent}"
        )
    return "\n".join(lines)
