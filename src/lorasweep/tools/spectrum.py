"""What rank did a trained adapter actually use? Singular values of its update, subspace overlap.

Per LoRA module, ``ΔW = scale · B · A`` (B: out×r, A: r×in). Thin QRs ``B = Q_B R_B``,
``Aᵀ = Q_A R_A`` give ``ΔW = scale · Q_B (R_B R_Aᵀ) Q_Aᵀ``, so only the r×r core is decomposed:
O((in + out)·r²), never the out×in matrix. From the spectrum: effective rank (Roy & Vetterli,
``exp(H(p))``, ``p = σ / Σσ``), energy ranks (smallest k holding 90 % / 99 % of ``Σσ²``), summaries
and a rank suggestion; ``subspace_similarity`` is φ of the LoRA paper (Hu et al. 2021, §7).
numpy + safetensors only (no torch, see ``adapter_files``), so the report can call it; the
figures are drawn by ``analysis.tool_plots``, the report section by ``analysis.report_sections``.
LoRA (rsLoRA, rank/alpha patterns), DoRA (the directional ``scale · B · A``; magnitudes
ignored) and AdaLoRA (``ΔW = B · diag(E) · A · alpha / init_r``). See docs/spectrum.md.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorasweep.tools.adapter_files import load_factors, pattern_key

ENERGIES = (0.9, 0.99)
# Relative threshold (σ / σ_max) under which a singular value counts as zero, by stored dtype.
_RTOL = {"F64": 1e-10, "F32": 1e-5, "F16": 1e-2, "BF16": 3e-2}


def lowrank_svd(
    b: np.ndarray, a: np.ndarray, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD of ``scale · b @ a`` without forming the product.

    Args:
        b: out×r factor (lora_B), a: r×in factor (lora_A).
        scale: the LoRA scaling multiplied into ΔW.

    Returns:
        ``(U, s, V)`` with U: out×k, s: k (descending), V: in×k, k = min(out, in, r), such that
        ``scale · b @ a == U @ diag(s) @ V.T``.
    """
    b = np.asarray(b, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    if min(b.shape[1], b.shape[0], a.shape[1]) == 0:  # an AdaLoRA module pruned to rank 0
        return np.zeros((b.shape[0], 0)), np.zeros(0), np.zeros((a.shape[1], 0))
    qb, rb = np.linalg.qr(b)  # out×k1, k1×r
    qa, ra = np.linalg.qr(a.T)  # in×k2, k2×r
    u, s, vt = np.linalg.svd(rb @ ra.T, full_matrices=False)  # the small k1×k2 core
    u, v = qb @ u, qa @ vt.T
    if scale < 0:
        u = -u
    return u, s * abs(scale), v


def effective_rank(s: Sequence[float] | np.ndarray) -> float:
    """Roy & Vetterli effective rank ``exp(-Σ p log p)``, ``p = σ / Σσ``; 0.0 for a zero update."""
    s = np.abs(np.asarray(s, dtype=np.float64))
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def energy_rank(s: Sequence[float] | np.ndarray, energy: float = 0.9) -> int:
    """Smallest k whose top-k singular values hold ``energy`` of ``Σσ²`` (0 for a zero update)."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    e = np.asarray(s, dtype=np.float64) ** 2
    total = e.sum()
    if total <= 0:
        return 0
    share = np.cumsum(e) / total
    k = int(np.searchsorted(share, energy * (1 - 1e-12), side="left")) + 1
    return min(k, len(e))


def _phi_matrix(u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """φ[i-1, j-1] = ‖u1[:, :i]ᵀ u2[:, :j]‖²_F / min(i, j) for all i, j (cumulative sums)."""
    g2 = (u1.T @ u2) ** 2
    cum = g2.cumsum(axis=0).cumsum(axis=1)
    i = np.arange(1, g2.shape[0] + 1)[:, None]
    j = np.arange(1, g2.shape[1] + 1)[None, :]
    return cum / np.minimum(i, j)


def _group(name: str) -> str:
    """'attention' or 'mlp' (everything not under an attention block)."""
    return "attention" if ("attention" in name or "attn" in name) else "mlp"


def module_type(name: str) -> str:
    """The part of a module path after the last layer index: ``attention.self.query``."""
    return re.split(r"(?:^|\.)\d+\.", name)[-1]


def _layer(name: str) -> int | None:
    found = re.findall(r"(?:^|\.)(\d+)\.", name)
    return int(found[-1]) if found else None


def _ekey(energy: float) -> str:
    return f"{energy:g}"


def adapter_spectrum(
    path: str | Path, energies: Sequence[float] = ENERGIES, label: str | None = None
) -> dict[str, Any]:
    """Singular values, effective rank and energy ranks of every LoRA module of a saved adapter.

    Returns a JSON-ready dict: ``modules`` (one entry per module with ``name``, ``r``,
    ``singular_values``, ``effective_rank``, ``energy_rank`` {"0.9": k, ...}, ``numerical_rank``,
    ``group``, ``type``, ``layer``, ``scale``, ``shape`` [out, in]), ``mean_effective_rank``,
    summaries ``groups`` (attention / mlp), ``by_type`` and ``by_layer``, and the
    ``suggested_rank`` / ``suggested_rank_pattern`` at the first energy (see :func:`suggest`).
    """
    energies = tuple(float(e) for e in energies)
    cfg, factors, dtype, notes = load_factors(path)
    rtol = _RTOL.get(dtype, 1e-5)
    modules = []
    for f in factors:
        _, s, _ = lowrank_svd(f["b"], f["a"], f["scale"])
        s_max = float(s[0]) if len(s) else 0.0
        modules.append(
            {
                "name": f["name"],
                "type": module_type(f["name"]),
                "group": _group(f["name"]),
                "layer": _layer(f["name"]),
                "r": f["r"],
                "shape": [int(f["b"].shape[0]), int(f["a"].shape[1])],
                "scale": f["scale"],
                "singular_values": [float(x) for x in s],
                "effective_rank": effective_rank(s),
                "numerical_rank": int((s > rtol * s_max).sum()) if s_max > 0 else 0,
                "energy_rank": {_ekey(e): energy_rank(s, e) for e in energies},
            }
        )
    if all(m["numerical_rank"] == 0 for m in modules):
        notes.append("every update is zero (lora_B is zero at init): was the adapter trained?")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    variant = "adalora" if peft_type == "ADALORA" else "dora" if cfg.get("use_dora") else "lora"
    out: dict[str, Any] = {
        "path": str(path),
        "label": label or Path(path).name,
        "variant": variant,
        "nominal_rank": int(cfg.get("init_r") or cfg.get("r") or max(m["r"] for m in modules)),
        "lora_alpha": cfg.get("lora_alpha"),
        "use_rslora": bool(cfg.get("use_rslora")),
        "dtype": dtype,
        "energies": list(energies),
        "notes": notes,
        "modules": modules,
        "mean_effective_rank": float(np.mean([m["effective_rank"] for m in modules])),
        "groups": _summaries(modules, "group", energies),
        "by_type": _summaries(modules, "type", energies),
        "by_layer": _summaries(modules, "layer", energies),
    }
    first = suggest(out, energy=energies[0]) if energies else {}
    out["suggested_rank"] = first.get("suggested_rank")
    out["suggested_rank_pattern"] = first.get("suggested_rank_pattern")
    return out


def _summaries(modules: list[dict], field: str, energies: Sequence[float]) -> dict[str, dict]:
    by: dict[str, list[dict]] = {}
    for m in modules:
        by.setdefault(str(m[field]), []).append(m)
    out = {}
    for key, ms in by.items():
        eff = [m["effective_rank"] for m in ms]
        ek = [(_ekey(e), [m["energy_rank"][_ekey(e)] for m in ms]) for e in energies]
        out[key] = {
            "modules": len(ms),
            "mean_r": float(np.mean([m["r"] for m in ms])),
            "mean_effective_rank": float(np.mean(eff)),
            "min_effective_rank": float(np.min(eff)),
            "max_effective_rank": float(np.max(eff)),
            "mean_energy_rank": {k: float(np.mean(v)) for k, v in ek},
            "max_energy_rank": {k: int(max(v)) for k, v in ek},
        }
    return out


def _next_pow2(k: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(k, 1))))


def _typepattern_key(mtype: str, members: list[str], all_names: list[str]) -> list[str]:
    """peft rank_pattern keys that match exactly the modules ``members`` (checked with peft's
    own matching rule): the shortest suffix of the type, else anchored on the layer index, else
    the full module names."""
    parts = mtype.split(".")
    want = set(members)
    candidates = [".".join(parts[-n:]) for n in range(1, len(parts) + 1)]
    candidates.append(r"\d+\." + re.escape(mtype))
    for key in candidates:
        if {n for n in all_names if pattern_key([key], n)} == want:
            return [key]
    return ["^" + re.escape(n) for n in members]


def suggest(
    spectrum: Mapping[str, Any],
    energy: float = 0.9,
    by: str = "group",
    power_of_two: bool = False,
) -> dict[str, Any]:
    """The smallest ranks that keep ``energy`` of every module's update energy ``Σσ²``.

    Args:
        spectrum: the output of :func:`adapter_spectrum` (ideally of a high-rank pilot run).
        by: the rank_pattern has one rank per ``"group"`` (attention, mlp) or per module
            ``"type"`` (``attention.self.query``); its keys follow peft's matching rule and are
            checked to match exactly the intended modules.
        power_of_two: round the uniform rank in ``variant`` up to a power of two.

    Returns:
        ``suggested_rank`` (max energy rank, at least 1), ``suggested_rank_pow2``, ``group_ranks``,
        ``type_ranks``, ``suggested_rank_pattern``, ``variant`` ``{"rank": k}``,
        ``pattern_variant`` ``{"rank_pattern": {...}}``, and ``saturated``: modules needing their
        full rank, where the pilot rank may be too small to tell (then ``note`` says so).
    """
    if by not in ("group", "type"):
        raise ValueError(f"by must be 'group' or 'type', got {by!r}")
    modules = spectrum["modules"]
    ranks = {m["name"]: max(1, energy_rank(m["singular_values"], energy)) for m in modules}
    group_ranks: dict[str, int] = {}
    type_ranks: dict[str, int] = {}
    members: dict[str, list[str]] = {}
    for m in modules:
        k = ranks[m["name"]]
        group_ranks[m["group"]] = max(group_ranks.get(m["group"], 0), k)
        type_ranks[m["type"]] = max(type_ranks.get(m["type"], 0), k)
        members.setdefault(m["type"], []).append(m["name"])
    names = [m["name"] for m in modules]
    type_group = {m["type"]: m["group"] for m in modules}
    pattern: dict[str, int] = {}
    for mtype, ms in members.items():
        k = type_ranks[mtype] if by == "type" else group_ranks[type_group[mtype]]
        for key in _typepattern_key(mtype, ms, names):
            pattern[key] = k
    uniform = max(ranks.values())
    saturated = [
        m["name"]
        for m in modules
        if energy_rank(m["singular_values"], energy) >= m["r"] and m["r"] < min(m["shape"])
    ]
    out: dict[str, Any] = {
        "energy": energy,
        "suggested_rank": uniform,
        "suggested_rank_pow2": _next_pow2(uniform),
        "group_ranks": group_ranks,
        "type_ranks": type_ranks,
        "suggested_rank_pattern": pattern,
        "variant": {"rank": _next_pow2(uniform) if power_of_two else uniform},
        "pattern_variant": {"rank_pattern": pattern},
        "saturated": saturated,
    }
    if saturated:
        out["note"] = (
            f"{len(saturated)} module(s) need their full rank for {energy:.0%} of the energy: "
            "the pilot rank may be too small, try a higher-rank pilot"
        )
    return out


def subspace_similarity(
    path_a: str | Path, path_b: str | Path, side: str = "right", top_k: int | None = None
) -> dict[str, Any]:
    """Per-module subspace similarity of two adapters (LoRA paper, §7.2).

    Uses the singular vectors of each ΔW ordered by singular value: ``side="right"`` the input
    space (rows of A), ``"left"`` the output space (columns of B). (The paper uses the right
    singular vectors of A alone; for ΔW these span the same space when B has full rank.)

    Returns ``modules``: per common module ``phi`` (r_a × r_b nested list, ``phi[i-1][j-1]`` =
    φ(i, j)), ``phi_at_min`` (φ(k, k), k = min(r_a, r_b)), ``mean_top_k`` (mean of φ(i, i) for
    i ≤ top_k, default k) and ``random_baseline`` (≈ k / dim, the expectation for random
    subspaces); plus their means over modules and modules present in only one adapter.
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    fa = {f["name"]: f for f in load_factors(path_a)[1]}
    fb = {f["name"]: f for f in load_factors(path_b)[1]}
    common = [n for n in fa if n in fb and fa[n]["r"] > 0 and fb[n]["r"] > 0]
    modules = []
    for name in common:
        ua, _, va = lowrank_svd(fa[name]["b"], fa[name]["a"], fa[name]["scale"])
        ub, _, vb = lowrank_svd(fb[name]["b"], fb[name]["a"], fb[name]["scale"])
        x, y = (va, vb) if side == "right" else (ua, ub)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{name}: shapes differ ({x.shape[0]} vs {y.shape[0]})")
        phi = _phi_matrix(x, y)
        k = min(phi.shape)
        kk = min(top_k or k, k)
        modules.append(
            {
                "name": name,
                "r_a": int(fa[name]["r"]),
                "r_b": int(fb[name]["r"]),
                "phi": phi.tolist(),
                "phi_at_min": float(phi[k - 1, k - 1]),
                "mean_top_k": float(np.mean(np.diag(phi)[:kk])),
                "top_k": kk,
                "random_baseline": k / x.shape[0],
            }
        )
    if not modules:
        raise ValueError(f"{path_a} and {path_b} have no LoRA module in common")
    return {
        "a": str(path_a),
        "b": str(path_b),
        "side": side,
        "modules": modules,
        "mean_phi_at_min": float(np.mean([m["phi_at_min"] for m in modules])),
        "mean_top_k": float(np.mean([m["mean_top_k"] for m in modules])),
        "only_in_a": [n for n in fa if n not in fb],
        "only_in_b": [n for n in fb if n not in fa],
    }


def analyze_adapter(
    path: str | Path,
    other: str | Path | None = None,
    energy: float = 0.9,
    energies: Sequence[float] = ENERGIES,
    by: str = "group",
    power_of_two: bool = False,
    side: str = "right",
) -> dict[str, Any]:
    """Everything ``lorasweep spectrum --json`` prints: the spectrum, the suggestion at
    ``energy`` (overriding the default one) and, with ``other``, ``similarity``."""
    energies = tuple(energies) if energy in energies else (energy, *energies)
    out = adapter_spectrum(path, energies)
    out["suggestion"] = suggest(out, energy, by=by, power_of_two=power_of_two)
    out["suggested_rank"] = out["suggestion"]["variant"]["rank"]
    out["suggested_rank_pattern"] = out["suggestion"]["suggested_rank_pattern"]
    if other is not None:
        out["similarity"] = subspace_similarity(path, other, side=side)
    return out


def format_spectrum(out: Mapping[str, Any]) -> str:
    """Readable text of :func:`analyze_adapter` output: one row per module (r, effective rank,
    energy ranks, numerical rank), the group summaries, the suggestion and the similarity."""
    energies = [_ekey(e) for e in out.get("energies", ENERGIES)]
    mods = out["modules"]
    width = max([len("module"), *(len(m["name"]) for m in mods)])
    head = f"{'module':<{width}}  {'group':9} {'r':>4} {'eff.rank':>8} "
    head += " ".join(f"{'E' + e:>6}" for e in energies) + f" {'num.rank':>8}"
    lines = [
        f"{out.get('label', '')}: {out.get('variant', 'lora')}, nominal rank "
        f"{out.get('nominal_rank')}, {len(mods)} modules, stored {out.get('dtype')}",
        "",
        head,
        "-" * len(head),
    ]
    for m in mods:
        ranks = " ".join(f"{m['energy_rank'].get(e, '-'):>6}" for e in energies)
        lines.append(
            f"{m['name']:<{width}}  {m['group']:9} {m['r']:>4} {m['effective_rank']:>8.2f} "
            f"{ranks} {m['numerical_rank']:>8}"
        )
    lines.append("")
    lines.append(f"mean effective rank {out['mean_effective_rank']:.2f}")
    for g, summ in out.get("groups", {}).items():
        top = ", ".join(f"{float(e):.0%}: {k}" for e, k in summ["max_energy_rank"].items())
        lines.append(
            f"  {g}: {summ['modules']} modules, effective rank {summ['mean_effective_rank']:.2f} "
            f"(min {summ['min_effective_rank']:.2f}, max {summ['max_effective_rank']:.2f}), "
            f"max energy rank {top}"
        )
    sug = out.get("suggestion")
    if sug:
        lines += [
            "",
            f"Suggestion at {sug['energy']:.0%} of the update energy: rank "
            f"{out.get('suggested_rank', sug['suggested_rank'])} (power of two: "
            f"{sug['suggested_rank_pow2']})",
            f"  per group: {json.dumps(sug['group_ranks'])}",
            f"  peft rank_pattern: {json.dumps(sug['suggested_rank_pattern'])}",
        ]
        if sug.get("note"):
            lines.append(f"  note: {sug['note']}")
    for n in out.get("notes", []):
        lines.append(f"note: {n}")
    sim = out.get("similarity")
    if sim:
        lines += [
            "",
            f"Subspace similarity with {sim['b']} ({sim['side']} singular vectors): "
            f"mean φ(k, k) {sim['mean_phi_at_min']:.3f}, mean top-k φ {sim['mean_top_k']:.3f}",
        ]
        for m in sim["modules"]:
            lines.append(
                f"  {m['name']:<{width}}  φ(k,k) {m['phi_at_min']:.3f}  (random "
                f"{m['random_baseline']:.3f}, r {m['r_a']} vs {m['r_b']})"
            )
        if sim.get("only_in_a") or sim.get("only_in_b"):
            lines.append(
                f"  only in one adapter: {len(sim['only_in_a'])} + {len(sim['only_in_b'])} modules"
            )
    return "\n".join(lines)


def report_spectra(adapter_dirs: Mapping[str, str | Path], energy: float = 0.9) -> dict[str, Any]:
    """What the sweep report shows of trained adapters: per adapter its spectrum (at ``energy``
    and 99 %), the suggestion at ``energy``, the largest energy ranks over modules and the notes;
    an adapter that cannot be read is listed with the reason.

    Returns:
        ``energy``; ``adapters``: ``[{"label", "spectrum", "suggestion", "energy_ranks"
        [at energy, at 99 %], "notes"}]``; ``failed``: ``[{"label", "error"}]``; ``pilot``: the
        adapter of the highest nominal rank (the one whose suggestion counts), or None.
    """
    adapters, failed = [], []
    for label, d in adapter_dirs.items():
        try:
            sp = adapter_spectrum(d, (energy, 0.99) if energy != 0.99 else (energy,), label=label)
        except (OSError, ValueError, KeyError) as exc:
            failed.append({"label": label, "error": str(exc)})
            continue
        e, sug = _ekey(energy), suggest(sp, energy)
        top = [max(m["energy_rank"].get(k, 0) for m in sp["modules"]) for k in (e, "0.99")]
        notes = sp["notes"] + ([sug["note"]] if "note" in sug else [])
        adapters.append(
            {"label": label, "spectrum": sp, "suggestion": sug, "energy_ranks": top, "notes": notes}
        )
    pilot = max(adapters, key=lambda a: a["spectrum"]["nominal_rank"]) if adapters else None
    return {"energy": energy, "adapters": adapters, "failed": failed, "pilot": pilot}
