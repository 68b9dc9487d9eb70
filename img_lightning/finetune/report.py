"""The HTML page of an evaluation: per case the image, the prompt, the reference instruction and the
answers of the base and the finetuned model (the layout of the paper's Fig. 12), under a table of
the aggregate metrics. Images are written next to the page (``images/``), text is escaped."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from ..atomic import atomic_path, atomic_write

_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
td, th { border: 1px solid #ccc; padding: 0.35em 0.6em; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
img { max-width: 192px; max-height: 192px; }
.q { color: #555; font-size: 0.85em; }
.s { color: #777; font-size: 0.8em; }
</style></head><body>
<h1>{{ title }}</h1>
<p>{{ description }}</p>
<table><tr><th>model</th><th>n</th><th>ROUGE-L</th><th>token F1</th><th>exact match</th>{% if judged %}<th>judge: consistent</th>{% endif %}</tr>
{% for name, m in metrics.items() %}<tr><td>{{ name }}</td><td>{{ m.n }}</td><td>{{ "%.4f"|format(m.rouge_l) }}</td>
<td>{{ "%.4f"|format(m.token_f1) }}</td><td>{{ "%.4f"|format(m.exact_match) }}</td>
{% if judged %}<td>{{ "%.3f"|format(m.judge_consistent) if m.judge_consistent is not none else "-" }}</td>{% endif %}</tr>
{% endfor %}</table>
<table><tr><th>image</th><th>prompt</th><th>reference instruction</th>{% for name in models %}<th>{{ name }} answer</th>{% endfor %}</tr>
{% for row in rows %}<tr><td><img src="{{ row.image }}" alt="case {{ loop.index }}"></td>
<td>{{ row.prompt }}<div class="q">{{ row.question }}</div></td><td>{{ row.reference }}</td>
{% for name in models %}<td>{{ row.answers[name].text }}<div class="s">ROUGE-L {{ "%.2f"|format(row.answers[name].rouge_l) }}{% if row.answers[name].judge is not none %}, judge: {{ "yes" if row.answers[name].judge else "no" }}{% endif %}</div></td>{% endfor %}
</tr>{% endfor %}
</table></body></html>
"""


def write_report(out_dir: str | Path, title: str, description: str, metrics: Mapping[str, Mapping[str, Any]],
                 cases: Sequence[Any], answers: Sequence[Mapping[str, Any]]) -> Path:
    """``answers[i][model]`` = ``{"text", "rouge_l", "judge"}`` for ``cases[i]``; returns index.html."""
    import jinja2

    out_dir = Path(out_dir)
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (case, row) in enumerate(zip(cases, answers)):
        name = f"images/{i:04d}.jpg"
        thumb = case.image.copy()
        thumb.thumbnail((384, 384))
        with atomic_path(out_dir / name) as tmp:
            thumb.save(tmp, format="JPEG", quality=90)
        first = next(iter(row.values()), {})
        rows.append({"image": name, "prompt": case.prompt, "reference": case.reference,
                     "question": first.get("question", ""), "answers": row})
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    html = env.from_string(_TEMPLATE).render(
        title=title, description=description, metrics=metrics, models=list(metrics), rows=rows,
        judged=any(m.get("judge_consistent") is not None for m in metrics.values()))
    return atomic_write(out_dir / "index.html", html)
