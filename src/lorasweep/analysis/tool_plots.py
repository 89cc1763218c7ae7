"""Plots of the tools, beside the sweep plots of ``plots``: adapter spectra and subspace
similarity (``lorasweep spectrum``, and the rank figure of the report's spectrum section) and the
memory estimate (``lorasweep estimate``).

As in ``plots``: ``*_data()`` functions turn a tool's output into what is drawn (no drawing),
``*_figure()`` renderers return a matplotlib ``Figure`` (Agg, no pyplot state). ``plot_spectra``,
``plot_similarity`` and ``plot_estimate`` write a tool's output straight to a PNG (the CLI's
``--plot``). numpy, pandas and matplotlib only: no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from lorasweep.analysis.plot_text import LABEL, LEGEND, new_figure
from lorasweep.analysis.units import GIB
from lorasweep.tools.spectrum import ENERGIES

ESTIMATE_PARTS = [
    ("base_weights_bytes", "base weights"),
    ("lora_weights_bytes", "LoRA weights"),
    ("gradient_bytes", "gradients"),
    ("optimizer_bytes", "optimizer"),
    ("activation_bytes", "activations"),
    ("overhead_bytes", "overhead"),
]


# ----------------------------------------------------------------------------- spectra


def spectra_data(spectra: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per adapter (``spectrum.adapter_spectrum`` outputs): its ``label``, the singular values
    of each non-zero module relative to the largest (``curves``), and ``energy``: the mean over
    those modules of the cumulative share of Σσ² against k (shorter modules padded with 1)."""
    out = []
    for sp in spectra:
        curves, cum = [], []
        for m in sp["modules"]:
            s = np.asarray(m["singular_values"])
            if not len(s) or s[0] <= 0:
                continue
            curves.append(np.maximum(s / s[0], 1e-12))
            cum.append(np.cumsum(s**2) / np.sum(s**2))
        energy = None
        if cum:
            width = max(len(c) for c in cum)
            energy = np.mean([np.pad(c, (0, width - len(c)), constant_values=1) for c in cum], 0)
        out.append({"label": sp.get("label"), "curves": curves, "energy": energy})
    return out


def spectra_figure(data: Sequence[Mapping[str, Any]]) -> Figure:
    """Singular values per module (log scale) and the mean cumulative energy vs k, per adapter."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_s, ax_e = fig.subplots(1, 2)
    for n, d in enumerate(data):
        color = f"C{n % 10}"
        for i, rel in enumerate(d["curves"]):
            lab = d["label"] if i == 0 else None
            ax_s.semilogy(np.arange(1, len(rel) + 1), rel, color=color, alpha=0.35, label=lab)
        if d["energy"] is not None:
            ks = np.arange(1, len(d["energy"]) + 1)
            ax_e.plot(ks, d["energy"], color=color, marker=".", label=d["label"])
    for e in ENERGIES:  # the energy levels the spectrum reports
        ax_e.axhline(e, color="grey", lw=0.8, ls=":")
    ax_s.set(xlabel="k", ylabel="σ_k / σ_1", title="Singular values of ΔW (per module)")
    ax_e.set(xlabel="k", ylabel="share of Σσ²", title="Cumulative energy (mean over modules)")
    ax_e.set_xscale("log", base=2)
    ax_s.legend(fontsize=8)
    ax_e.legend(fontsize=8)
    return fig


def plot_spectra(spectra: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write :func:`spectra_figure` of ``spectrum.adapter_spectrum`` outputs to ``path``."""
    spectra_figure(spectra_data(spectra)).savefig(path, dpi=110)
    return Path(path)


# ----------------------------------------------------------------------------- similarity


def similarity_data(sim: Mapping[str, Any], max_panels: int = 8) -> dict[str, Any]:
    """The φ(i, j) panels of ``spectrum.subspace_similarity`` output: the mean over modules first
    (when every module has the same shape), then up to ``max_panels - 1`` modules."""
    mods = sim["modules"]
    shapes = {np.shape(m["phi"]) for m in mods}
    panels = []
    if len(shapes) == 1 and len(mods) > 1:
        panels.append(("mean over modules", np.mean([m["phi"] for m in mods], axis=0)))
    panels += [(m["name"], np.asarray(m["phi"])) for m in mods][: max_panels - len(panels)]
    return {"panels": panels, "side": sim.get("side", "right")}


def similarity_figure(data: Mapping[str, Any]) -> Figure:
    """Heatmaps of φ(i, j), four per row, with one colour bar."""
    panels = data["panels"]
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
    fig.suptitle(f"Subspace similarity ({data['side']} singular vectors)")
    return fig


def plot_similarity(sim: Mapping[str, Any], path: str | Path, max_panels: int = 8) -> Path:
    """Write :func:`similarity_figure` of ``spectrum.subspace_similarity`` output to ``path``."""
    similarity_figure(similarity_data(sim, max_panels)).savefig(path, dpi=110)
    return Path(path)


# ----------------------------------------------------------------------------- rank used


def rank_use_data(adapters: Sequence[Mapping[str, Any]], energy: float = 0.9) -> pd.DataFrame:
    """One row per analysed adapter (``spectrum.report_spectra``'s ``adapters``): its
    ``nominal_rank``, ``mean_effective_rank`` and ``energy_rank`` (the largest over modules at
    ``energy``); ``attrs["energy"]``."""
    out = pd.DataFrame(
        {
            "label": [a["spectrum"]["label"] for a in adapters],
            "nominal_rank": [float(a["spectrum"]["nominal_rank"]) for a in adapters],
            "mean_effective_rank": [a["spectrum"]["mean_effective_rank"] for a in adapters],
            "energy_rank": [a["energy_ranks"][0] for a in adapters],
        }
    )
    out.attrs["energy"] = energy
    return out


def rank_use_figure(data: pd.DataFrame) -> Figure:
    """Mean effective rank and largest energy rank against the nominal rank (log2 axes)."""
    energy = data.attrs.get("energy", 0.9)
    fig, ax = new_figure("Rank used by the trained adapters")  # legible on a phone
    x = data["nominal_rank"].to_numpy(dtype=float)
    ax.scatter(x, data["mean_effective_rank"], label="mean effective rank")
    ax.scatter(x, data["energy_rank"], marker="x", label=f"max {energy:.0%} rank")
    lim = [1, max(x.max(), 2)]
    ax.plot(lim, lim, color="grey", ls="--", lw=0.8, label="= nominal rank")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("nominal rank r", fontsize=LABEL)
    ax.set_ylabel("rank used", fontsize=LABEL)
    ax.legend(fontsize=LEGEND, frameon=False)
    return fig


# ----------------------------------------------------------------------------- estimate


def estimate_data(result: Any) -> pd.DataFrame:
    """Memory parts per rank in GiB (``estimate.EstimateResult``): one row per rank, a column per
    part (``ESTIMATE_PARTS`` labels) and ``total``; ``attrs``: ``gpus`` {GiB: [names]} and
    ``title``."""
    rows = result.rows
    out = pd.DataFrame({label: [row[k] / GIB for row in rows] for k, label in ESTIMATE_PARTS})
    out.insert(0, "rank", [row["rank"] for row in rows])
    out["total"] = [row["total_bytes"] / GIB for row in rows]
    gpus: dict[float, list[str]] = {}
    for name, gib in result.gpus.items():
        gpus.setdefault(gib, []).append(name)
    out.attrs["gpus"] = gpus
    out.attrs["title"] = (
        f"{result.model}: {result.variant}, {result.dtype}, batch {result.batch} x "
        f"{result.seq}, {result.device}"
    )
    return out


def estimate_figure(data: pd.DataFrame) -> Figure:
    """Memory vs rank, stacked by part, with a dashed line at each GPU size up to a little above
    the largest total."""
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    xs = list(range(len(data)))
    labels = [label for _, label in ESTIMATE_PARTS]
    ax.stackplot(xs, [data[label] for label in labels], labels=labels, alpha=0.85)
    top = float(data["total"].max())
    gpus = data.attrs.get("gpus", {})
    for gib, names in sorted(gpus.items()):
        if gib <= max(top * 1.6, min(gpus)):
            ax.axhline(gib, color="black", linestyle="--", linewidth=0.8)
            ax.text(xs[-1], gib, " / ".join(names), ha="right", va="bottom", fontsize=8)
            top = max(top, gib)
    ax.set_xticks(xs, [str(r) for r in data["rank"]])
    ax.set_ylim(0, top * 1.12)
    ax.set_xlabel("LoRA rank")
    ax.set_ylabel("GiB")
    ax.set_title(data.attrs.get("title", ""), fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def plot_estimate(result: Any, path: str | Path) -> Path:
    """Write :func:`estimate_figure` of an ``estimate.EstimateResult`` to ``path``."""
    path = Path(path)
    estimate_figure(estimate_data(result)).savefig(path, dpi=120)
    return path
