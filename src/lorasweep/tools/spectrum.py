"""What rank did a trained adapter actually use? Singular values of its update, subspace overlap.

Per LoRA module, ``ΔW = scale · B · A`` (B: out×r, A: r×in). Thin QRs ``B = Q_B R_B``,
``Aᵀ = Q_A R_A`` give ``ΔW = scale · Q_B (R_B R_Aᵀ) Q_Aᵀ``, so only the r×r core is decomposed:
O((in + out)·r²), never the out×in matrix. From the spectrum: effective rank (Roy & Vetterli,
``exp(H(p))``, ``p = σ / Σσ``), energy ranks (smallest k holding 90 % / 99 % of ``Σσ²``), summaries
and a rank suggestion; ``subspace_similarity`` is φ of the LoRA paper (Hu et al. 2021, §7).
numpy + safetensors only (no torch), so the report can call it. LoRA (rsLoRA, rank/alpha
patterns), DoRA (the directional ``scale · B · A``; magnitudes ignored) and AdaLoRA
(``ΔW = B · diag(E) · A · alpha / init_r``). See docs/spectrum.md.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ENERGIES = (0.9, 0.99)
_PREFIX = "base_model.model."
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


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], str]:
    """All tensors as numpy arrays, plus the widest-error stored dtype (bf16 widened by hand:
    numpy has no bfloat16, so safetensors.numpy cannot load it)."""
    with path.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        metas = {k: v for k, v in header.items() if k != "__metadata__"}
        dtypes = {v["dtype"] for v in metas.values()}
        dtype = next((d for d in ("BF16", "F16", "F32") if d in dtypes), "F64")
        if "BF16" not in dtypes:
            from safetensors.numpy import load_file

            return load_file(str(path)), dtype
        data = f.read()
    np_types = {"F64": np.float64, "F32": np.float32, "F16": np.float16}
    out = {}
    for key, meta in metas.items():
        start, end = meta["data_offsets"]
        raw = data[start:end]
        if meta["dtype"] == "BF16":  # bf16 is the top half of an f32
            arr = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, np_types[meta["dtype"]])
        out[key] = arr.reshape(meta["shape"])
    return out, dtype


def _pattern_key(keys: Iterable[str], name: str) -> str | None:
    """The first pattern key matching module ``name``, as peft's ``get_pattern_key`` does."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _group(name: str) -> str:
    """'attention' or 'mlp' (everything not under an attention block)."""
    return "attention" if ("attention" in name or "attn" in name) else "mlp"


def _module_type(name: str) -> str:
    """The part of a module path after the last layer index: ``attention.self.query``."""
    return re.split(r"(?:^|\.)\d+\.", name)[-1]


def _layer(name: str) -> int | None:
    found = re.findall(r"(?:^|\.)(\d+)\.", name)
    return int(found[-1]) if found else None


def _load_factors(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]], str, list[str]]:
    """Config, per-module factors ``{"name", "a", "b", "scale"}``, stored dtype and notes."""
    path = Path(path)
    cfg_file = path / "adapter_config.json"
    if not cfg_file.exists():
        subs = sorted(p.parent.name for p in path.glob("*/adapter_config.json"))
        hint = f"; adapters in sub-folders: {', '.join(subs)}" if subs else ""
        raise FileNotFoundError(f"no adapter_config.json in {path}{hint}")
    cfg = json.loads(cfg_file.read_text())
    weights = path / "adapter_model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(
            f"no adapter_model.safetensors in {path} (only safetensors is read)"
        )
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type not in ("LORA", "ADALORA"):
        raise ValueError(f"spectrum supports LoRA, DoRA and AdaLoRA adapters, not {peft_type}")
    tensors, dtype = _read_safetensors(weights)

    parts: dict[str, dict[str, np.ndarray]] = {}
    pat = re.compile(r"^(.*)\.(lora_A|lora_B|lora_E|lora_embedding_A|lora_embedding_B)(\.weight)?$")
    for key, value in tensors.items():
        m = pat.match(key)
        if m:
            name = m.group(1).removeprefix(_PREFIX)
            parts.setdefault(name, {})[m.group(2)[-1]] = value  # "A", "B" or "E"

    notes = (
        ["DoRA: analysed scale·B·A; the magnitude vector is ignored"] if cfg.get("use_dora") else []
    )
    alpha0 = float(cfg.get("lora_alpha") or 8)
    alpha_pattern = cfg.get("alpha_pattern") or {}
    modules = []
    for name in sorted(parts, key=_natural_key):
        p = parts[name]
        if "A" not in p or "B" not in p:
            notes.append(f"{name}: missing lora_A or lora_B, skipped")
            continue
        a = p["A"].reshape(p["A"].shape[0], -1)  # conv A: r×in×kh×kw
        b = p["B"].reshape(p["B"].shape[0], -1)  # conv B: out×r×1×1
        r = a.shape[0]
        if peft_type == "ADALORA":  # scaling = alpha / ranknum, ranknum = init_r
            init_r = float(cfg.get("init_r") or cfg.get("r") or r)
            scale = (alpha0 if alpha0 > 0 else init_r) / init_r
            if "E" in p:
                a = a * p["E"].reshape(-1, 1)
        else:
            key = _pattern_key(alpha_pattern, name)
            alpha = float(alpha_pattern[key]) if key is not None else alpha0
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        modules.append({"name": name, "a": a, "b": b, "scale": scale, "r": r})
    if not modules:
        raise ValueError(f"no LoRA modules (lora_A/lora_B pairs) found in {weights}")
    return cfg, modules, dtype, notes


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


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
    cfg, factors, dtype, notes = _load_factors(path)
    rtol = _RTOL.get(dtype, 1e-5)
    modules = []
    for f in factors:
        _, s, _ = lowrank_svd(f["b"], f["a"], f["scale"])
        s_max = float(s[0]) if len(s) else 0.0
        modules.append(
            {
                "name": f["name"],
                "type": _module_type(f["name"]),
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


def _type_pattern_key(mtype: str, members: list[str], all_names: list[str]) -> list[str]:
    """peft rank_pattern keys that match exactly the modules ``members`` (checked with peft's
    own matching rule): the shortest suffix of the type, else anchored on the layer index, else
    the full module names."""
    parts = mtype.split(".")
    want = set(members)
    candidates = [".".join(parts[-n:]) for n in range(1, len(parts) + 1)]
    candidates.append(r"\d+\." + re.escape(mtype))
    for key in candidates:
        if {n for n in all_names if _pattern_key([key], n)} == want:
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
        for key in _type_pattern_key(mtype, ms, names):
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
    fa = {f["name"]: f for f in _load_factors(path_a)[1]}
    fb = {f["name"]: f for f in _load_factors(path_b)[1]}
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


def plot_spectra(spectra: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Singular values per module (log scale) and the mean cumulative energy vs k, per adapter."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_s, ax_e = fig.subplots(1, 2)
    for n, sp in enumerate(spectra):
        color = f"C{n % 10}"
        curves: list[np.ndarray] = []
        for m in sp["modules"]:
            s = np.asarray(m["singular_values"])
            if not len(s) or s[0] <= 0:
                continue
            ks = np.arange(1, len(s) + 1)
            lab = None if curves else sp.get("label")
            ax_s.semilogy(ks, np.maximum(s / s[0], 1e-12), color=color, alpha=0.35, label=lab)
            curves.append(np.cumsum(s**2) / np.sum(s**2))
        if curves:
            width = max(len(c) for c in curves)
            mean = np.mean([np.pad(c, (0, width - len(c)), constant_values=1) for c in curves], 0)
            ax_e.plot(np.arange(1, width + 1), mean, color=color, marker=".", label=sp.get("label"))
    for e in ENERGIES:
        ax_e.axhline(e, color="grey", lw=0.8, ls=":")
    ax_s.set(xlabel="k", ylabel="σ_k / σ_1", title="Singular values of ΔW (per module)")
    ax_e.set(xlabel="k", ylabel="share of Σσ²", title="Cumulative energy (mean over modules)")
    ax_e.set_xscale("log", base=2)
    ax_s.legend(fontsize=8)
    ax_e.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_similarity(sim: Mapping[str, Any], path: str | Path, max_panels: int = 8) -> Path:
    """Heatmaps of φ(i, j): the mean over modules first, then up to ``max_panels - 1`` modules."""
    from matplotlib.figure import Figure

    mods = sim["modules"]
    shapes = {np.shape(m["phi"]) for m in mods}
    panels = []
    if len(shapes) == 1 and len(mods) > 1:
        panels.append(("mean over modules", np.mean([m["phi"] for m in mods], axis=0)))
    panels += [(m["name"], np.asarray(m["phi"])) for m in mods][: max_panels - len(panels)]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(3.2 * cols, 3.0 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, (title, phi) in zip(axes, panels):
        img = ax.imshow(phi, vmin=0, vmax=1, cmap="viridis", origin="upper", aspect="auto")
        ri, rj = phi.shape
        ax.set_xticks(range(rj), [str(j + 1) if rj <= 16 else "" for j in range(rj)], fontsize=6)
        ax.set_yticks(range(ri), [str(i + 1) if ri <= 16 else "" for i in range(ri)], fontsize=6)
        ax.set_title(title if len(title) < 40 else "…" + title[-39:], fontsize=8)
        ax.set(xlabel="j (b)", ylabel="i (a)")
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    fig.colorbar(img, ax=list(axes[: len(panels)]), shrink=0.8, label="φ(i, j)")
    fig.suptitle(f"Subspace similarity ({sim.get('side', 'right')} singular vectors)")
    fig.savefig(path, dpi=110)
    return Path(path)


def _rank_figure_png(rows: list[tuple], energy: float) -> str:
    """Base64 PNG: mean effective rank and max energy rank against nominal rank."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.8), layout="constrained")
    ax = fig.subplots()
    x = np.array([sp["nominal_rank"] for sp, *_ in rows], dtype=float)
    ax.scatter(x, [sp["mean_effective_rank"] for sp, *_ in rows], label="mean effective rank")
    ax.scatter(x, [top[0] for _, _, top, _ in rows], marker="x", label=f"max {energy:.0%} rank")
    lim = [1, max(x.max(), 2)]
    ax.plot(lim, lim, color="grey", ls="--", lw=0.8, label="= nominal rank")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set(xlabel="nominal rank r", ylabel="rank", title="Rank used by the trained adapters")
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def spectrum_section_html(
    adapter_dirs: Mapping[str, str | Path],
    energy: float = 0.9,
    verify: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """HTML fragment for the sweep report: effective vs nominal rank per trained adapter, a plot,
    and the rank suggested by the highest-rank adapter. Unreadable adapters get a row saying why.

    ``verify``: records of ``lorasweep spectrum --verify`` (``verify.verify_report_info``): the
    trials of the suggested variants are marked in the table, and each record gets a paragraph
    and a table comparing the suggested variants with the pilot's variant.
    """
    suggested = {v: rec for rec in (verify or []) for v in rec.get("variants", {})}
    rows, failed = [], []
    for label, d in adapter_dirs.items():
        try:
            sp = adapter_spectrum(d, (energy, 0.99) if energy != 0.99 else (energy,), label=label)
        except (OSError, ValueError, KeyError) as exc:
            failed.append((label, str(exc)))
            continue
        e, sug = _ekey(energy), suggest(sp, energy)
        top = [max(m["energy_rank"].get(k, 0) for m in sp["modules"]) for k in (e, "0.99")]
        notes = sp["notes"] + ([sug["note"]] if "note" in sug else [])
        rows.append((sp, sug, top, notes))
    esc = html.escape
    parts = ['<section class="spectrum">', "<h2>Adapter spectra: the rank actually used</h2>"]
    if not rows and not failed:
        parts.append("<p>No saved adapters to analyse.</p></section>")
        return "\n".join(parts)
    parts.append(
        "<p>Effective rank: exp of the entropy of the normalised singular values of ΔW = scale·B·A"
        f" (Roy &amp; Vetterli), averaged over modules. Energy rank: the smallest k holding "
        f"{energy:.0%} (or 99%) of Σσ², the maximum over modules.</p>"
    )
    head = ["trial", "variant", "nominal r", "mean effective rank", f"energy rank {energy:.0%}"]
    head += ["energy rank 99%", "suggested rank", "notes"]
    parts.append("<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>")
    parts.append("</thead><tbody>")
    for sp, sug, top, notes in rows:
        rec = suggested.get(str(sp["label"]).split("/")[0])
        if rec is not None:
            notes = [f"verifies the suggestion of {rec.get('pilot')}", *notes]
        cells = [sp["label"], sp["variant"], sp["nominal_rank"], f"{sp['mean_effective_rank']:.2f}"]
        cells += [*top, sug["suggested_rank"], "; ".join(notes)]
        parts.append("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in cells) + "</tr>")
    for label, err in failed:
        parts.append(f'<tr><td>{esc(label)}</td><td colspan="7">not analysed: {esc(err)}</td></tr>')
    parts.append("</tbody></table>")
    if rows:
        png = _rank_figure_png(rows, energy)
        parts.append(f'<img alt="effective vs nominal rank" src="data:image/png;base64,{png}">')
        pilot, sug, _, _ = max(rows, key=lambda row: row[0]["nominal_rank"])
        parts.append(
            f"<p>Suggested from the highest-rank adapter ({esc(pilot['label'])}): rank "
            f"<b>{sug['suggested_rank']}</b> (power of two: {sug['suggested_rank_pow2']}) keeps "
            f"{energy:.0%} of the update energy in every module; per group "
            f"<code>{esc(json.dumps(sug['group_ranks']))}</code>, as a spec variant "
            f"<code>{esc(json.dumps(sug['pattern_variant']))}</code>.</p>"
        )
    for rec in verify or []:
        parts.append(_verify_html(rec))
    parts.append("</section>")
    return "\n".join(parts)


def _verify_html(rec: Mapping[str, Any]) -> str:
    """One ``--verify`` record: what was added from which pilot, and the comparison."""
    esc = html.escape
    added = rec.get("variants") or {}
    what = ", ".join(f"<code>{esc(n)}: {esc(json.dumps(v))}</code>" for n, v in added.items())
    parts = [
        '<div class="verify">',
        f"<h3>Suggestion verified: {esc(str(rec.get('pilot')))}</h3>",
        f"<p>The suggestion of {esc(str(rec.get('pilot')))} at {float(rec.get('energy', 0.9)):.0%}"
        f" of the update energy (rank {esc(str(rec.get('suggested_rank')))}, per group "
        f"<code>{esc(json.dumps(rec.get('group_ranks', {})))}</code>) was added to the sweep as "
        f"{what or 'no new variant'}, so it is measured, not trusted. They are ordinary variants:"
        " the statistics above compare them with the grid.</p>",
    ]
    if rec.get("notes"):
        parts.append("<ul>" + "".join(f"<li>{esc(n)}</li>" for n in rec["notes"]) + "</ul>")
    rows = rec.get("compare") or []
    if rows:
        metric = rows[0]["metric"]
        head = ["variant", "rank", "complete trials", f"mean {metric}", ""]
        parts.append("<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head))
        parts.append("</tr></thead><tbody>")
        for r in rows:
            mean = "-" if r["mean"] is None else f"{r['mean']:.4g}"
            rank = "pattern" if r["rank"] is None else r["rank"]
            mark = "suggested" if r["suggested"] else "pilot's variant"
            cells = [r["variant"], rank, r["trials"], mean, mark]
            cls = ' class="suggested"' if r["suggested"] else ""
            parts.append(f"<tr{cls}>" + "".join(f"<td>{esc(str(c))}</td>" for c in cells) + "</tr>")
        parts.append("</tbody></table>")
    parts.append("</div>")
    return "\n".join(parts)
