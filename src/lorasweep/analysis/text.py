"""The plain text of an analysis: the table per configuration, the recommendation and its
reason, the marginal means of the factors and their interaction, and the flags, as
``lorasweep analyze`` prints them. Reads ``stats.analyze``'s dict; computes nothing.
"""

from __future__ import annotations

from typing import Any

from lorasweep.analysis.explain import fmt_cost, group_label
from lorasweep.analysis.settings import level_label, readable
from lorasweep.analysis.units import decimals_for, fmt_fixed, fmt_mean_std, fmt_num, fmt_p


def table_cost(v: float | None, cost: str | None) -> str:
    """A cost in the plain-text table: with its unit when known, else the number alone."""
    if cost and cost.endswith(("bytes", "seconds", "params")):
        return fmt_cost(v, cost)
    return fmt_num(v)


def format_analysis(result: dict[str, Any]) -> str:
    """Plain-text table per configuration (n, mean ± std, difference to the best of the others
    with its worst 95% end, within the margin, Holm p against the best, cost), the
    recommendation with its reason, the marginal means and interaction of the factors (when
    two or more vary), and the flags."""
    metric, direction = result["metric"], result["direction"]
    best_key = (result.get("best") or {}).get("key")
    rec_key = (result.get("recommended") or {}).get("key")
    margin = result.get("margin") or {}
    design = result.get("design") or {}
    places = decimals_for(design.get("sigma")) or decimals_for(margin.get("absolute"))
    head = f"{metric} ({direction} is better)"
    if margin:
        head += f"; margin {margin['absolute']:.3g}"
    rows = [("config", "n", "mean ± std", "diff (bound)", "in margin", "p_adj", "cost", "")]
    for g in result["groups"]:
        mark = []
        if g["key"] == best_key:
            mark.append("best")
        if g["key"] == rec_key:
            mark.append("recommended")
        if g["significantly_worse"]:
            mark.append("worse")
        if g.get("note") and g["key"] != rec_key:
            mark.append(g["note"])
        diff = (
            f"{fmt_fixed(g['diff'], places, signed=True)} "
            f"({fmt_fixed(g['diff_bound'], places, signed=True)})"
            if g.get("diff") is not None
            else "-"
        )
        rows.append(
            (
                group_label(g["key"]),
                str(g["n"]),
                fmt_mean_std(g["mean"], g["std"]),
                diff,
                "yes" if g.get("within_margin") else "no",
                fmt_p(g["p_adjusted"]),
                table_cost(g["cost"], result.get("cost")),
                "; ".join(mark),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [head, ""]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += [
        "",
        "Recommendation: " + (group_label(rec_key) if rec_key else "none"),
        result["reason"],
    ]
    lines += factor_lines(result)
    if result["flags"]:
        lines += ["", "Flags:"] + [f"  - {f}" for f in result["flags"]]
    return "\n".join(lines)


def factor_lines(result: dict[str, Any]) -> list[str]:
    """The marginal means (when two or more factors vary) and the interaction sentence."""
    f = result.get("factors") or {}
    lines: list[str] = []
    if len(f.get("names") or []) >= 2:
        lines += ["", f"Marginal means of {f['metric']} (each level averaged over the other "
                  "factors' levels and the seeds; n trials):"]  # fmt: skip
        for name in f["names"]:
            levels = ", ".join(
                f"{level_label(name, r['level'])} {fmt_num(r['mean'])} (n={r['n']})"
                + (" best" if r["best"] else "")
                for r in f["marginal"][name]
            )
            lines.append(f"  {readable(name)}: {levels}")
        if f.get("note"):
            lines.append(f"  {f['note']}")
    if result.get("interaction"):
        lines += ["", "Interaction: " + result["interaction"]]
    return lines
