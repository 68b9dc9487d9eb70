"""The evaluation report: CSV (one row per prompt), JSON (means, win rates, intervals, metric
descriptions), an HTML gallery (base | control | IMG per prompt, with scores) and a PNG chart of
the win rates. Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .prompts import PromptRecord
from .stats import mean_ci, paired_comparison

SPATIAL_PROXY_NOTE = (
    "spatial_proxy (and the spatial part of the 3-in-1 complex score) uses an open-vocabulary detector from "
    "transformers as a PROXY for T2I-CompBench's UniDet; compare arms within this report, not with published numbers."
)
HPS_NOTE = "HPS v2.0 and v2.1 scores are not comparable with each other; the version used is listed under metrics."


@dataclass
class ReportInputs:
    prompts: Sequence[PromptRecord]
    scores: dict[str, dict[str, dict[str, float]]]  # arm -> metric -> uid -> score
    images: dict[str, dict[str, str]]  # arm -> uid -> image path
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # metric -> describe()
    img_arms: Sequence[str] = ()  # the IMG rounds, last = the main IMG arm
    title: str = "IMG evaluation"
    config: dict[str, Any] = field(default_factory=dict)


def _atomic_write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    tmp.replace(path)


def _finite(x: Optional[float]) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def arms_in_order(inp: ReportInputs) -> list[str]:
    order = ["base", "control", *inp.img_arms]
    return [a for a in order if a in inp.scores or a in inp.images] + sorted(
        a for a in set(inp.scores) | set(inp.images) if a not in order
    )


def metric_names(inp: ReportInputs) -> list[str]:
    names: list[str] = list(inp.metrics)
    for per_arm in inp.scores.values():
        names += [m for m in per_arm if m not in names]
    return names


def summarize(inp: ReportInputs, num_resamples: int = 1000, seed: int = 0, tie_tolerance: float = 0.0) -> dict:
    """Means per arm and metric, and paired comparisons of each IMG round with base and control."""
    arms = arms_in_order(inp)
    metrics = metric_names(inp)
    means: dict[str, dict[str, Any]] = {}
    for metric in metrics:
        means[metric] = {}
        for arm in arms:
            vals = [v for v in inp.scores.get(arm, {}).get(metric, {}).values() if _finite(v)]
            if vals:
                means[metric][arm] = {"n": len(vals), **mean_ci(vals, num_resamples, seed).to_dict()}
    comparisons = []
    for img_arm in inp.img_arms:
        for ref in ("base", "control"):
            if ref not in inp.scores or img_arm not in inp.scores:
                continue
            for metric in metrics:
                a = inp.scores[img_arm].get(metric, {})
                b = inp.scores[ref].get(metric, {})
                uids = [u for u in a if u in b and _finite(a[u]) and _finite(b[u])]
                if not uids:
                    continue
                cmp = paired_comparison([a[u] for u in uids], [b[u] for u in uids], num_resamples, seed,
                                        tie_tolerance=tie_tolerance)
                comparisons.append({"arm": img_arm, "versus": ref, "metric": metric, **cmp.to_dict()})
    categories: dict[str, dict[str, dict[str, float]]] = {}
    by_cat: dict[str, list[str]] = {}
    for p in inp.prompts:
        if p.category:
            by_cat.setdefault(p.category, []).append(p.uid)
    for cat, uids in sorted(by_cat.items()):
        for metric in metrics:
            for arm in arms:
                s = inp.scores.get(arm, {}).get(metric, {})
                vals = [s[u] for u in uids if u in s and _finite(s[u])]
                if vals:
                    categories.setdefault(cat, {}).setdefault(metric, {})[arm] = sum(vals) / len(vals)
    notes = []
    if any(d.get("kind") in ("spatial_proxy", "t2i_complex") for d in inp.metrics.values()):
        notes.append(SPATIAL_PROXY_NOTE)
    if any(d.get("kind") == "hps" for d in inp.metrics.values()):
        notes.append(HPS_NOTE)
    return {
        "title": inp.title,
        "num_prompts": len(inp.prompts),
        "arms": arms,
        "img_arm": inp.img_arms[-1] if inp.img_arms else None,
        "metrics": {m: inp.metrics.get(m, {"name": m}) for m in metrics},
        "means": means,
        "comparisons": comparisons,
        "categories": categories,
        "bootstrap": {"resamples": num_resamples, "seed": seed, "interval": 0.95, "tie_tolerance": tie_tolerance},
        "notes": notes,
        "config": inp.config,
    }


def write_csv(inp: ReportInputs, path: Path) -> Path:
    arms, metrics = arms_in_order(inp), metric_names(inp)
    buf = io.StringIO()
    w = csv.writer(buf)
    cols = [f"{arm}/{m}" for m in metrics for arm in arms]
    w.writerow(["uid", "prompt", "category", "subtype", *cols, *[f"{arm}/image" for arm in arms]])
    for p in inp.prompts:
        row: list[Any] = [p.uid, p.text, p.category or "", p.subtype or ""]
        for m in metrics:
            for arm in arms:
                v = inp.scores.get(arm, {}).get(m, {}).get(p.uid)
                row.append("" if not _finite(v) else f"{v:.6g}")
        for arm in arms:  # image paths relative to the CSV, like the gallery's links
            img = inp.images.get(arm, {}).get(p.uid)
            row.append(os.path.relpath(img, path.parent) if img else "")
        w.writerow(row)
    _atomic_write(path, buf.getvalue())
    return path


def write_chart(summary: dict, path: Path) -> Path:
    """Stacked win / tie / loss bars with the win rate's 95% interval, one bar per comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [c for c in summary["comparisons"] if c["arm"] == summary["img_arm"]] or summary["comparisons"]
    labels = [f"{c['metric']}\nvs {c['versus']}" for c in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rows) + 1.5), 4.0), dpi=120)
    if rows:
        x = range(len(rows))
        win = [c["win"]["value"] for c in rows]
        tie = [c["tie"]["value"] for c in rows]
        loss = [c["loss"]["value"] for c in rows]
        err_lo = [c["win"]["value"] - c["win"]["low"] for c in rows]
        err_hi = [c["win"]["high"] - c["win"]["value"] for c in rows]
        ax.bar(x, win, color="#2a9d8f", label="IMG wins", yerr=[err_lo, err_hi], capsize=3)
        ax.bar(x, tie, bottom=win, color="#bbbbbb", label="tie")
        ax.bar(x, loss, bottom=[w + t for w, t in zip(win, tie)], color="#e76f51", label="IMG loses")
        ax.axhline(0.5, color="black", lw=0.8, ls="--")
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, fontsize=8)
    else:
        ax.text(0.5, 0.5, "no paired scores", ha="center", va="center")
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of prompts")
    ax.set_title(f"{summary['title']}: {summary['img_arm'] or 'IMG'} win rate (95% CI)", fontsize=9)
    if rows:
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    _atomic_write(path, buf.getvalue())
    return path


def _fmt(v: Optional[float]) -> str:
    return "–" if not _finite(v) else f"{v:.4g}"


def write_html(inp: ReportInputs, summary: dict, path: Path, limit: int = 200, thumb: int = 256) -> Path:
    """Gallery: one row per prompt, columns base | control | IMG rounds, each image with its scores.
    Image links are relative to the report folder, so the run directory can be copied as a whole."""
    arms, metrics = arms_in_order(inp), metric_names(inp)
    e = html.escape
    out = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(summary['title'])}</title>",
        "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px;vertical-align:top;font-size:12px}"
        ".p{max-width:260px}.s{font-family:monospace}.note{color:#a33}</style></head><body>",
        f"<h1>{e(summary['title'])}</h1><p>{summary['num_prompts']} prompts; IMG arm: "
        f"<b>{e(str(summary['img_arm']))}</b></p>",
    ]
    for note in summary["notes"]:
        out.append(f"<p class='note'>{e(note)}</p>")
    out.append("<h2>Means (95% bootstrap CI)</h2><table><tr><th>metric</th>")
    out += [f"<th>{e(a)}</th>" for a in arms] + ["</tr>"]
    for m in metrics:
        out.append(f"<tr><td>{e(m)}</td>")
        for a in arms:
            r = summary["means"].get(m, {}).get(a)
            out.append(f"<td class='s'>{_fmt(r['value'])} [{_fmt(r['low'])}, {_fmt(r['high'])}]</td>" if r else "<td>–</td>")
        out.append("</tr>")
    out.append("</table><h2>Win rates</h2><table><tr><th>IMG arm</th><th>vs</th><th>metric</th><th>n</th>"
               "<th>win</th><th>tie</th><th>loss</th><th>mean diff</th></tr>")
    for c in summary["comparisons"]:
        cells = "".join(
            f"<td class='s'>{_fmt(c[k]['value'])} [{_fmt(c[k]['low'])}, {_fmt(c[k]['high'])}]</td>"
            for k in ("win", "tie", "loss", "mean_diff")
        )
        out.append(f"<tr><td>{e(c['arm'])}</td><td>{e(c['versus'])}</td><td>{e(c['metric'])}</td><td>{c['n']}</td>{cells}</tr>")
    out.append("</table><p><img src='winrate.png' alt='win rates'></p><h2>Gallery</h2><table><tr><th>prompt</th>")
    out += [f"<th>{e(a)}</th>" for a in arms] + ["</tr>"]
    for p in list(inp.prompts)[:limit]:
        out.append(f"<tr><td class='p'><b>{e(p.uid)}</b> {e(p.category or '')}<br>{e(p.text)}</td>")
        for a in arms:
            img = inp.images.get(a, {}).get(p.uid)
            scores = "<br>".join(
                f"{e(m)}: {_fmt(inp.scores.get(a, {}).get(m, {}).get(p.uid))}" for m in metrics
            )
            if img:
                rel = os.path.relpath(img, path.parent)
                out.append(f"<td><img src='{e(rel)}' width='{thumb}' loading='lazy'><div class='s'>{scores}</div></td>")
            else:
                out.append("<td>–</td>")
        out.append("</tr>")
    out.append("</table></body></html>")
    _atomic_write(path, "\n".join(out))
    return path


def write_report(inp: ReportInputs, out_dir: str | Path, num_resamples: int = 1000, seed: int = 0,
                 tie_tolerance: float = 0.0, gallery_limit: int = 200, thumb_size: int = 256) -> dict[str, Path]:
    """Write report.csv, report.json, winrate.png and index.html into ``out_dir``."""
    out = Path(out_dir)
    summary = summarize(inp, num_resamples, seed, tie_tolerance)
    paths = {
        "csv": write_csv(inp, out / "report.csv"),
        "chart": write_chart(summary, out / "winrate.png"),
    }
    _atomic_write(out / "report.json", json.dumps(summary, indent=2, default=str))
    paths["json"] = out / "report.json"
    paths["html"] = write_html(inp, summary, out / "index.html", gallery_limit, thumb_size)
    return paths
