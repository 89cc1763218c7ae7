"""How an analysis shows itself in a notebook: the recommendation as an object with a card, the
``stats.analyze`` dict with its comparison table, and several figures shown in one cell.

Jupyter (and IPython) call ``_repr_html_`` / ``_repr_markdown_`` / ``_repr_pretty_`` on the
value of a cell; nothing here imports IPython. Everything reads ``stats.analyze``'s dict and
formats it with the words of the plain-text table (``text.format_analysis``); it computes
nothing.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorasweep.analysis.explain import group_label
from lorasweep.analysis.settings import readable, value_text
from lorasweep.analysis.text import factor_lines, format_analysis, table_cost
from lorasweep.analysis.units import decimals_for, fmt_fixed, fmt_mean_std, fmt_num, fmt_p

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Analysis", "Figures", "Recommendation", "analysis_rows"]

NO_RECOMMENDATION = "No recommendation"
GREEN, AMBER = "#2e7d32", "#b26a00"
_CARD = (
    "border:1px solid {c};border-left:6px solid {c};border-radius:4px;padding:6px 12px;"
    "margin:6px 0;max-width:60em"
)
_TH = "text-align:left;padding:1px 12px 1px 0;font-weight:normal;color:#555;vertical-align:top"
_TD = "text-align:left;padding:1px 0"


def _e(x: Any) -> str:
    return html.escape(str(x))


def _flags_html(flags: Iterable[str]) -> str:
    items = "".join(f"<li>{_e(f)}</li>" for f in flags)
    return (
        f"<p style='margin:4px 0'><b>Flags</b></p><ul style='margin:0'>{items}</ul>"
        if items
        else ""
    )


@dataclass(frozen=True)
class Recommendation:
    """The recommended configuration, or why there is none (``found`` False; ``key`` and
    ``label`` then None). ``str()`` is the paragraph the CLI prints and the report's card shows
    (``"Recommended lora r=8: ..."`` or ``"No recommendation: ..."``); ``bool()`` is ``found``;
    in Jupyter it shows as a card. Build it with ``from_analysis`` (``Results.recommendation``).
    """

    found: bool
    reason: str
    """the whole paragraph: the configuration, why, the margin, the noise model"""
    key: dict[str, Any] | None = None
    """the configuration: ``{"variant": "lora", "rank": 32, "learning_rate": 0.01}``"""
    label: str | None = None
    """``"lora r=32 lr=0.01"``"""
    metric: str | None = None
    direction: str | None = None
    mean: float | None = None
    std: float | None = None
    n: int | None = None
    margin: float | None = None
    """how much worse than the best still counts as good enough, in the metric's units"""
    margin_text: str | None = None
    """the margin as given: ``"0.01 (default for this metric)"``, ``"2% of the best (0.015)"``"""
    diff: float | None = None
    """measured difference to the best of the others (positive: better)"""
    diff_bound: float | None = None
    """the worst end of its simultaneous 95% interval (within the margin when recommended)"""
    reference: str | None = None
    """the best of the others, the configuration ``diff`` is measured against"""
    noise_sd: float | None = None
    """the residual standard deviation of the noise model the bounds come from"""
    cost: float | None = None
    cost_name: str | None = None
    """the column that was minimised (``train_seconds``)"""
    criterion: str | None = None
    """``"cost"`` (the cheapest shown within the margin) or ``"cost tie"``"""
    seeds_needed: int | None = None
    """seeds per configuration that would show the margin at the measured noise"""
    best: dict[str, Any] | None = None
    """the best measured configuration: key, label, mean, std, n"""
    flags: tuple[str, ...] = ()

    @classmethod
    def from_analysis(cls, result: Mapping[str, Any]) -> Recommendation:
        """The recommendation of a ``stats.analyze`` result."""
        reason, rec = str(result["reason"]), result.get("recommended")
        if not rec and not reason.startswith(NO_RECOMMENDATION):
            reason = f"{NO_RECOMMENDATION}: {reason}"
        m, best = result.get("margin") or {}, result.get("best")
        common = {
            "metric": result.get("metric"),
            "direction": result.get("direction"),
            "margin": m.get("absolute"),
            "margin_text": _margin_text(m),
            "noise_sd": (result.get("design") or {}).get("sigma"),
            "cost_name": result.get("cost"),
            "criterion": result.get("criterion"),
            "seeds_needed": result.get("seeds_needed"),
            "best": _brief(best) if best else None,
            "flags": tuple(result.get("flags") or ()),
        }
        if not rec:
            return cls(found=False, reason=reason, **common)
        return cls(
            found=True,
            reason=reason,
            key=dict(rec["key"]),
            label=group_label(rec["key"]),
            mean=rec.get("mean"),
            std=rec.get("std"),
            n=rec.get("n"),
            diff=rec.get("diff"),
            diff_bound=rec.get("diff_bound"),
            reference=group_label(rec["reference"]) if rec.get("reference") else None,
            cost=rec.get("cost"),
            **common,
        )

    @classmethod
    def none(cls, why: str) -> Recommendation:
        """No recommendation, and why (an analysis that could not run)."""
        return cls(found=False, reason=f"{NO_RECOMMENDATION}: {why}")

    def __str__(self) -> str:
        return self.reason

    def __bool__(self) -> bool:
        return self.found

    def __repr__(self) -> str:
        if not self.found:
            return f"Recommendation(None, reason={_clip(self.reason)!r})"
        value = fmt_mean_std(self.mean, self.std)
        return f"Recommendation({self.label!r}, {self.metric}={value}, n={self.n})"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython's plain text: the paragraph
        p.text(self.reason)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serializable dict."""
        d = asdict(self)
        d["flags"] = list(self.flags)
        return d

    @property
    def explanation(self) -> str:
        """The reason without its ``"Recommended lora r=8: "`` / ``"No recommendation: "``
        opening (the card's heading says it)."""
        opening = f"Recommended {self.label}: " if self.found else f"{NO_RECOMMENDATION}: "
        return self.reason.removeprefix(opening)

    def _facts(self) -> list[tuple[str, str]]:
        """(heading, value) rows of the card."""
        better = f" ({self.direction} is better)" if self.direction else ""
        rows: list[tuple[str, str]] = []
        if self.found:
            config = ", ".join(
                f"{readable(k)} {value_text(v)}" for k, v in (self.key or {}).items()
            )
            rows.append(("configuration", config))
            rows.append((f"{self.metric}{better}", _measured(self.mean, self.std, self.n)))
            if self.diff is not None:
                places = decimals_for(self.noise_sd) or decimals_for(self.margin)
                vs = f"{fmt_fixed(self.diff, places, signed=True)}, at worst "
                vs += f"{fmt_fixed(self.diff_bound, places, signed=True)}"
                rows.append((f"vs {self.reference or 'the best of the others'}", vs))
        elif self.best:
            b = self.best
            measured = _measured(b["mean"], b["std"], b["n"])
            rows.append(("best measured", f"{b['label']}: {self.metric} {measured}"))
        if self.margin_text:
            rows.append(("margin", self.margin_text))
        if self.found and self.cost_name:
            how = "; tied, fewer parameters" if self.criterion == "cost tie" else ""
            rows.append(("cost", f"{table_cost(self.cost, self.cost_name)} "
                         f"({self.cost_name}, the cheapest within the margin{how})"))  # fmt: skip
        if not self.found and self.seeds_needed:
            rows.append(("seeds needed", f"about {self.seeds_needed} per configuration"))
        return rows

    def _repr_html_(self) -> str:
        color = GREEN if self.found else AMBER
        title = f"Recommended: {self.label}" if self.found else NO_RECOMMENDATION
        facts = "".join(
            f"<tr><th style='{_TH}'>{_e(h)}</th><td style='{_TD}'>{_e(v)}</td></tr>"
            for h, v in self._facts()
        )
        table = f"<table style='margin:4px 0;border:none'>{facts}</table>" if facts else ""
        return (
            f"<div class='lorasweep-recommendation' style='{_CARD.format(c=color)}'>"
            f"<div style='font-size:1.15em;color:{color}'><b>{_e(title)}</b></div>{table}"
            f"<p style='margin:4px 0'>{_e(self.explanation)}</p>"
            f"{_flags_html(self.flags)}</div>"
        )

    def _repr_markdown_(self) -> str:
        title = f"**Recommended: {self.label}**" if self.found else f"**{NO_RECOMMENDATION}**"
        lines = [title, ""] + [f"- {h}: {v}" for h, v in self._facts()]
        lines += ["", self.explanation]
        if self.flags:
            lines += ["", "Flags:"] + [f"- {f}" for f in self.flags]
        return "\n".join(lines)


def _clip(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _measured(mean: float | None, std: float | None, n: int | None) -> str:
    return f"{fmt_mean_std(mean, std)} (n={n})" if n is not None else fmt_mean_std(mean, std)


def _brief(group: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "key": dict(group["key"]),
        "label": group_label(group["key"]),
        "mean": group.get("mean"),
        "std": group.get("std"),
        "n": group.get("n"),
    }


def _margin_text(m: Mapping[str, Any]) -> str | None:
    if not m or m.get("absolute") is None:
        return None
    text = fmt_num(m["absolute"])
    if m.get("relative"):
        text = f"{m['value'] * 100:g}% of the best ({text})"
    return text + (" (default for this metric)" if m.get("default") else " (given)")


def analysis_rows(result: Mapping[str, Any]) -> list[dict[str, str]]:
    """The comparison table of ``text.format_analysis`` as formatted cells, one dict per
    configuration: config, n, mean ± std, diff (bound), in margin, p_adj, cost, note."""
    best_key = (result.get("best") or {}).get("key")
    rec_key = (result.get("recommended") or {}).get("key")
    margin = result.get("margin") or {}
    design = result.get("design") or {}
    places = decimals_for(design.get("sigma")) or decimals_for(margin.get("absolute"))
    rows = []
    for g in result["groups"]:
        marks = [w for w, on in (("best", g["key"] == best_key),
                                 ("recommended", g["key"] == rec_key),
                                 ("worse", g.get("significantly_worse"))) if on]  # fmt: skip
        if g.get("note") and g["key"] != rec_key:
            marks.append(g["note"])
        diff = "-"
        if g.get("diff") is not None:
            diff = (f"{fmt_fixed(g['diff'], places, signed=True)} "
                    f"({fmt_fixed(g['diff_bound'], places, signed=True)})")  # fmt: skip
        rows.append(
            {
                "config": group_label(g["key"]),
                "n": str(g["n"]),
                "mean ± std": fmt_mean_std(g["mean"], g["std"]),
                "diff (bound)": diff,
                "in margin": "yes" if g.get("within_margin") else "no",
                "p_adj": fmt_p(g.get("p_adjusted")),
                "cost": table_cost(g.get("cost"), result.get("cost")),
                "note": "; ".join(marks),
            }
        )
    return rows


class Analysis(dict):
    """``stats.analyze``'s dict, unchanged (``a["recommended"]``, ``json.dumps(a)``), that
    shows itself: in Jupyter the comparison table, the recommendation card and the flags; as
    plain text (``repr``, ``print``) the table ``lorasweep analyze`` prints."""

    @property
    def recommendation(self) -> Recommendation:
        return Recommendation.from_analysis(self)

    def text(self) -> str:
        """The plain text ``lorasweep analyze`` prints (``format_analysis``)."""
        return format_analysis(self)

    def __repr__(self) -> str:
        try:
            return self.text()
        except (KeyError, TypeError, ValueError):  # not an analyze result after all
            return dict.__repr__(self)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))

    def _repr_html_(self) -> str:
        rec = self.recommendation
        head = f"<b>{_e(self.get('metric'))}</b> ({_e(self.get('direction'))} is better)"
        if (self.get("margin") or {}).get("absolute") is not None:
            head += f"; margin {_e(rec.margin_text)}"
        factors = "\n".join(line.strip() for line in factor_lines(self) if line.strip())
        more = (
            f"<pre style='font-size:0.9em;white-space:pre-wrap'>{_e(factors)}</pre>"
            if factors
            else ""
        )
        return (
            f"<div class='lorasweep-analysis'><p style='margin:4px 0'>{head}</p>"
            f"{_table_html(analysis_rows(self))}{rec._repr_html_()}{more}</div>"
        )


def _table_html(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "<p>No configuration has a complete trial.</p>"
    head = "".join(f"<th style='text-align:left;padding:2px 8px'>{_e(c)}</th>" for c in rows[0])
    body = []
    for r in rows:
        style = " style='background:#e8f5e9;font-weight:bold'" if "recommended" in r["note"] else ""
        cells = "".join(
            f"<td style='text-align:left;padding:2px 8px'>{_e(v)}</td>" for v in r.values()
        )
        body.append(f"<tr{style}>{cells}</tr>")
    return (
        f"<table class='lorasweep-table'><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>"
    )


class Figures(list):
    """Several matplotlib Figures that show together, one under the other, when they are the
    value of a notebook cell (a cell shows only its last value). A list of Figures otherwise:
    ``figs[0].savefig(...)``, ``figs.save(folder)``; ``names`` says which is which and
    ``skipped`` which could not be drawn and why."""

    def __init__(
        self, named: Iterable[tuple[str, Figure]] = (), skipped: Mapping[str, str] | None = None
    ):
        pairs = list(named)
        super().__init__(fig for _, fig in pairs)
        self.names = [name for name, _ in pairs]
        self.skipped = dict(skipped or {})

    def save(self, folder: str | Path, *, prefix: str = "", dpi: int = 100) -> list[Path]:
        """Write each figure as ``folder/<prefix><name>.png``; the paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, fig in zip(self.names, self, strict=True):
            paths.append(folder / f"{prefix}{name}.png")
            fig.savefig(paths[-1], dpi=dpi)
        return paths

    def __repr__(self) -> str:
        skipped = f", skipped={list(self.skipped)}" if self.skipped else ""
        return f"Figures({self.names}{skipped})"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))

    def _repr_html_(self) -> str:
        parts = []
        for name, fig in zip(self.names, self, strict=True):
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=100)
            data = base64.b64encode(buf.getvalue()).decode("ascii")
            parts.append(f"<div><img alt='{_e(name)}' src='data:image/png;base64,{data}'/></div>")
        for name, why in self.skipped.items():
            parts.append(f"<p style='color:#555'>{_e(name)}: {_e(why)}</p>")
        return "<div class='lorasweep-figures'>" + "".join(parts) + "</div>"
