"""The evaluation report: CSV (one row per prompt), JSON (means, win rates, intervals, metric
descriptions), an HTML page (rendered from ``templates/report.html.j2`` with Jinja2: the metrics
with their reference, scale, version and checkpoint sha256; the means laid out one row per arm and
one column per metric in config order, so rows paste next to a published table; win rates; a
gallery), the same table as ``table.md`` / ``table.tsv``, and a PNG chart of the win rates. Every
file is written to a temporary name and renamed.

A column computed through a proxy (``exact: false`` in its description) carries "(proxy)" in its
header and a footnote saying why; images a metric could not score (an unparseable MLLM answer) are
counted per arm and shown, with examples of the answers, never folded into the mean as zeros.

Every table (means, table.md/.tsv, categories, win rates) of a metric is computed over the same
prompts: those of the current prompt set (within the metric's categories) that have a score in
every arm, and prints their number ``n``; arms lacking scores for some prompts are named in a
warning with counts. A metric with scores but no stored description is refused.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..atomic import atomic_write
from ..errors import UserError
from ..eval_run.prompts import PromptRecord
from .stats import mean_ci, paired_comparison

PROXY_KINDS = ("spatial_proxy", "t2i_complex", "blip_vqa")  # always proxies, whatever an old metrics.json says
DEFAULT_PROXY_NOTE = ("computed through a PROXY of the benchmark's own pipeline; compare arms within this report, "
                      "not with published numbers")
ANSWER_EXAMPLES = 5  # unparsed answers shown per metric and arm


@dataclass
class ReportInputs:
    prompts: Sequence[PromptRecord]
    scores: dict[str, dict[str, dict[str, float]]]  # arm -> metric -> uid -> score (NaN: not scored)
    images: dict[str, dict[str, str]]  # arm -> uid -> image path
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # metric -> describe()
    img_arms: Sequence[str] = ()  # the IMG rounds, last = the main IMG arm
    title: str = "IMG evaluation"
    config: dict[str, Any] = field(default_factory=dict)
    run_dir: Optional[Path] = None  # where scores/{arm}/answers/ are (unparsed MLLM answers)
    warnings: Sequence[str] = ()  # shown above the results (e.g. arms with constant images)
    # metric -> the uids it is meant to score (a scorer limited to some categories); default: every prompt
    scopes: dict[str, set[str]] = field(default_factory=dict)
    img_settings: dict[str, Any] = field(default_factory=dict)  # the IMG arm's settings (aligner sha256, ...)
    # arm -> the arm whose images it has, byte for byte, for every prompt (control = base with the
    # released SDXL settings): reported as one row, "base = control", and compared once
    same_images: dict[str, str] = field(default_factory=dict)


class ReportError(UserError):
    """The report cannot be made honestly from what the run directory holds."""


def _finite(x: Optional[float]) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def arms_in_order(inp: ReportInputs) -> list[str]:
    order = ["base", "control", *inp.img_arms]
    return [a for a in order if a in inp.scores or a in inp.images] + sorted(
        a for a in set(inp.scores) | set(inp.images) if a not in order
    )


def shown_arms(inp: ReportInputs) -> list[str]:
    """The arms with a row of their own: an arm with another's very images is that arm's row."""
    return [a for a in arms_in_order(inp) if a not in inp.same_images]


def arm_labels(inp: ReportInputs) -> dict[str, str]:
    """Row label per shown arm: ``base = control`` for an arm whose images another arm has too."""
    labels = {a: a for a in shown_arms(inp)}
    for arm, source in inp.same_images.items():
        labels[source] = f"{labels.get(source, source)} = {arm}"
    return labels


def metric_names(inp: ReportInputs) -> list[str]:
    """The metrics, in config order; a metric with scores but no description is refused (it would
    be reported without its version, checkpoint hash or proxy label)."""
    names: list[str] = list(inp.metrics)
    for per_arm in inp.scores.values():
        for m in per_arm:
            if m not in names:
                raise ReportError(f"metric '{m}' has scores but no stored description (model, version, checkpoint "
                                  f"sha256, exact/proxy); rerun `img-eval score` to record it")
    return names


def common_uids(inp: ReportInputs, metric: str, arms: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    """The prompts every arm has a finite ``metric`` score for, in prompt-set order (the set every
    table and comparison of the metric is computed over), and per arm how many of the prompts the
    metric is meant for have no stored score at all."""
    scope = inp.scopes.get(metric)
    wanted = [p.uid for p in inp.prompts if scope is None or p.uid in scope]
    per_arm = [inp.scores.get(a, {}).get(metric, {}) for a in arms]
    missing = {a: sum(u not in s for u in wanted) for a, s in zip(arms, per_arm, strict=True)}
    common = [u for u in wanted if all(u in s and _finite(s[u]) for s in per_arm)]
    return common, {a: n for a, n in missing.items() if n}


def is_proxy(desc: dict[str, Any]) -> bool:
    return desc.get("kind") in PROXY_KINDS or desc.get("exact") is False


def column_labels(inp: ReportInputs, metrics: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Header of each metric column ("Spatial (proxy) [1]") and the numbered footnotes."""
    labels, notes = {}, []
    for m in metrics:
        desc = inp.metrics.get(m, {})
        label = desc.get("label") or m
        if is_proxy(desc):
            notes.append(f"{label}: {desc.get('note') or DEFAULT_PROXY_NOTE}")
            label = f"{label} (proxy) [{len(notes)}]"
        labels[m] = label
    return labels, notes


def _unparsed_examples(inp: ReportInputs, metric: str, arm: str) -> list[dict[str, Any]]:
    if inp.run_dir is None:
        return []
    from .scoring import read_answers

    bad = [r for r in read_answers(inp.run_dir, arm, metric) if not r.get("parsed", True)]
    return [{"uid": r.get("uid"), "error": r.get("error"), "answer": str(r.get("answer", ""))[:400]}
            for r in bad[:ANSWER_EXAMPLES]]


def summarize(inp: ReportInputs, num_resamples: int = 1000, seed: int = 0, tie_tolerance: float = 0.0) -> dict:
    """Means per arm and metric, and paired comparisons of each IMG round with base and control."""
    arms = shown_arms(inp)
    metrics = metric_names(inp)
    labels, footnotes = column_labels(inp, metrics)
    means: dict[str, dict[str, Any]] = {}
    unscored: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = {}
    warnings = list(inp.warnings)
    common: dict[str, list[str]] = {}
    for metric in metrics:
        means[metric] = {}
        common[metric], missing = common_uids(inp, metric, arms)
        counts[metric] = len(common[metric])
        scope = inp.scopes.get(metric)
        wanted = [p.uid for p in inp.prompts if scope is None or p.uid in scope]
        if missing:
            warnings.append(f"{labels[metric]}: no score stored for " + ", ".join(
                f"{a} {n} of {len(wanted)}" for a, n in missing.items()) + f" prompts; every table of this metric "
                f"uses only the n={counts[metric]} prompts scored in every arm")
        elif counts[metric] < len(wanted):
            warnings.append(f"{labels[metric]}: every table of this metric uses the n={counts[metric]} of "
                            f"{len(wanted)} prompts with a score in every arm (see the images without a score)")
        for arm in arms:
            s = inp.scores.get(arm, {}).get(metric, {})
            got = [s[u] for u in wanted if u in s]
            bad = sum(not _finite(v) for v in got)
            if common[metric]:
                means[metric][arm] = {"n": counts[metric],
                                      **mean_ci([s[u] for u in common[metric]], num_resamples, seed).to_dict()}
            if bad:
                unscored.setdefault(metric, {})[arm] = {
                    "count": bad, "of": len(got), "examples": _unparsed_examples(inp, metric, arm)}
    comparisons = []
    for img_arm in inp.img_arms:
        for ref in ("base", "control"):
            if ref not in arms or img_arm not in arms:
                continue
            for metric in metrics:
                uids = common[metric]
                if not uids:
                    continue
                a, b = inp.scores[img_arm][metric], inp.scores[ref][metric]
                cmp = paired_comparison([a[u] for u in uids], [b[u] for u in uids], num_resamples, seed,
                                        tie_tolerance=tie_tolerance)
                comparisons.append({"arm": img_arm, "versus": ref, "metric": metric, **cmp.to_dict()})
    categories: dict[str, dict[str, dict[str, Any]]] = {}
    by_cat: dict[str, set[str]] = {}
    for p in inp.prompts:
        if p.category:
            by_cat.setdefault(p.category, set()).add(p.uid)
    for cat, members in sorted(by_cat.items()):
        for metric in metrics:
            uids = [u for u in common[metric] if u in members]
            if uids:
                categories.setdefault(cat, {})[metric] = {
                    "n": len(uids), **{arm: sum(inp.scores[arm][metric][u] for u in uids) / len(uids) for arm in arms}}
    notes = [f"Warning: {w}" for w in warnings] + [f"[{i}] {n}" for i, n in enumerate(footnotes, 1)]
    for arm, source in inp.same_images.items():
        notes.append(f"{arm} = {source}: every {arm} image is the {source} image, byte for byte ({arm}'s settings "
                     f"equal {source}'s: img-eval copies such images instead of generating them again, see reused_from "
                     f"in the metadata). It is one row, '{source} = {arm}', and IMG's comparisons with {source} are "
                     f"its comparisons with {arm}.")
    if any(d.get("kind") == "hps" for d in inp.metrics.values()):
        notes.append("HPS: 100 x cosine (hpsv2.score() returns the raw cosine: divide by 100 to compare); v2.0 and "
                     "v2.1 scores are not comparable with each other, the version used is listed under metrics.")
    for metric, per_arm in unscored.items():
        listed = ", ".join(f"{arm} {u['count']} of {u['of']}" for arm, u in per_arm.items())
        notes.append(f"{labels[metric]}: images without a score (left out of the means, not counted as 0): {listed}.")
    return {
        "title": inp.title,
        "num_prompts": len(inp.prompts),
        "arms": arms,
        "arm_labels": arm_labels(inp),
        "same_images": dict(inp.same_images),
        "img_arm": inp.img_arms[-1] if inp.img_arms else None,
        "metrics": {m: inp.metrics.get(m, {"name": m}) for m in metrics},
        "labels": labels,
        "means": means,
        "n": counts,
        "img_settings": inp.img_settings,
        "unscored": unscored,
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
    atomic_write(path, buf.getvalue())
    return path


CHART_WIDTH_IN, CHART_DPI = 8.0, 110  # 880 px wide whatever the number of comparisons: fits a report page


def write_chart(summary: dict, path: Path) -> Path:
    """Stacked win / tie / loss bars with the win rate's 95% interval, one horizontal bar per
    comparison (more comparisons make the chart taller, never wider)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [c for c in summary["comparisons"] if c["arm"] == summary["img_arm"]] or summary["comparisons"]
    labels = [f"{summary['labels'].get(c['metric'], c['metric'])} vs "
              f"{summary['arm_labels'].get(c['versus'], c['versus'])}"
              for c in rows]
    fig, ax = plt.subplots(figsize=(CHART_WIDTH_IN, 1.6 + 0.38 * max(1, len(rows))), dpi=CHART_DPI)
    if rows:
        y = list(range(len(rows)))[::-1]  # the first comparison on top
        win = [c["win"]["value"] for c in rows]
        tie = [c["tie"]["value"] for c in rows]
        loss = [c["loss"]["value"] for c in rows]
        err_lo = [c["win"]["value"] - c["win"]["low"] for c in rows]
        err_hi = [c["win"]["high"] - c["win"]["value"] for c in rows]
        ax.barh(y, win, color="#2a9d8f", label="IMG wins", xerr=[err_lo, err_hi], capsize=3)
        ax.barh(y, tie, left=win, color="#bbbbbb", label="tie")
        ax.barh(y, loss, left=[w + t for w, t in zip(win, tie, strict=True)], color="#e76f51", label="IMG loses")
        ax.axvline(0.5, color="black", lw=0.8, ls="--")
        ax.set_yticks(y)
        ax.set_yticklabels(labels, fontsize=8)
    else:
        ax.text(0.5, 0.5, "no paired scores", ha="center", va="center")
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of prompts")
    ax.set_title(f"{summary['title']}: {summary['img_arm'] or 'IMG'} win rate (95% CI)", fontsize=9)
    if rows:  # under the axes: the bars fill their whole width
        fig.legend(fontsize=7, loc="lower center", ncols=3, frameon=False)
    fig.tight_layout(rect=(0, 0.07 if rows else 0, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return path


def _fmt(v: Optional[float], digits: int = 4) -> str:
    return "–" if not _finite(v) else f"{v:.{digits}g}"


def paste_table(summary: dict, decimals: int = 4) -> list[list[str]]:
    """Rows ``[arm, value per metric...]`` (header first): one row per arm, the metrics in config
    order, plain means with ``decimals`` digits, like the comparison tables of papers; the last row
    ``n`` is the number of prompts behind each column (the same in every arm)."""
    metrics = list(summary["metrics"])
    rows = [["arm", *(summary["labels"][m] for m in metrics)]]
    for arm in summary["arms"]:
        cells = [summary["means"][m].get(arm) for m in metrics]
        values = ("" if c is None else f"{c['value']:.{decimals}f}" for c in cells)
        rows.append([summary["arm_labels"].get(arm, arm), *values])
    rows.append(["n", *(str(summary["n"][m]) for m in metrics)])  # prompts behind every mean of the column
    return rows


def write_tables(summary: dict, out: Path) -> dict[str, Path]:
    rows = paste_table(summary)
    md = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    if summary["notes"]:
        md += ["", *summary["notes"]]
    if summary.get("img_settings"):
        md += ["", "IMG arm: " + ", ".join(f"{k}={v}" for k, v in summary["img_settings"].items())]
    atomic_write(out / "table.md", "\n".join(md) + "\n")
    atomic_write(out / "table.tsv", "\n".join("\t".join(r) for r in rows) + "\n")
    return {"table_md": out / "table.md", "table_tsv": out / "table.tsv"}


def _environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(loader=PackageLoader("img_lightning.evaluation", "templates"),
                      autoescape=select_autoescape(["html", "j2"]), undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = _fmt
    return env


METRIC_FIELDS = ("kind", "model", "version", "sha256", "reference", "scale")  # their own columns; the rest: details


def write_html(inp: ReportInputs, summary: dict, path: Path, limit: int = 200, thumb: int = 256) -> Path:
    """The report page. Image links are relative to the report folder, so the run directory can be
    copied as a whole."""
    arms, metrics = shown_arms(inp), metric_names(inp)
    metric_rows = []
    for m in metrics:
        d = summary["metrics"][m]
        details = {k: v for k, v in d.items() if k not in (*METRIC_FIELDS, "name", "label", "exact", "note")
                   and v not in (None, "")}
        metric_rows.append({"name": m, "label": summary["labels"][m], "proxy": is_proxy(d), "note": d.get("note"),
                            **{k: d.get(k) for k in METRIC_FIELDS}, "details": details})
    gallery = []
    for p in list(inp.prompts)[:limit]:
        cells = []
        for a in arms:
            img = inp.images.get(a, {}).get(p.uid)
            cells.append({
                "src": os.path.relpath(img, path.parent) if img else None,
                "scores": [(summary["labels"][m], inp.scores.get(a, {}).get(m, {}).get(p.uid)) for m in metrics],
            })
        gallery.append({"prompt": p, "cells": cells})
    html = _environment().get_template("report.html.j2").render(
        s=summary, arms=arms, metrics=metrics, metric_rows=metric_rows, gallery=gallery, thumb=thumb,
        table=paste_table(summary),
    )
    atomic_write(path, html)
    return path


def write_report(inp: ReportInputs, out_dir: str | Path, num_resamples: int = 1000, seed: int = 0,
                 tie_tolerance: float = 0.0, gallery_limit: int = 200, thumb_size: int = 256) -> dict[str, Path]:
    """Write report.csv, report.json, table.md, table.tsv, winrate.png and index.html into ``out_dir``."""
    out = Path(out_dir)
    summary = summarize(inp, num_resamples, seed, tie_tolerance)
    paths = {
        "csv": write_csv(inp, out / "report.csv"),
        "chart": write_chart(summary, out / "winrate.png"),
        **write_tables(summary, out),
    }
    atomic_write(out / "report.json", json.dumps(summary, indent=2, default=str))
    paths["json"] = out / "report.json"
    paths["html"] = write_html(inp, summary, out / "index.html", gallery_limit, thumb_size)
    return paths
