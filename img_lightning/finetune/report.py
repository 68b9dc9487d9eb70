"""The HTML page of an evaluation: per case the image, the prompt, the reference instruction and the
answers of the base and the finetuned model (the layout of the paper's Fig. 12), under a table of
the aggregate metrics. Images are written next to the page (``images/``), text is escaped."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_path, atomic_write

# One string, split into pieces only to keep the source lines short.
_TEMPLATE = (
    "<!doctype html>\n"
    '<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>\n'
    "<style>\n"
    "body { font-family: system-ui, sans-serif; margin: 1.5em; }\n"
    "table { border-collapse: collapse; margin-bottom: 1.5em; }\n"
    "td, th { border: 1px solid #ccc; padding: 0.35em 0.6em; vertical-align: top; text-align: left; }\n"
    "th { background: #f3f3f3; }\n"
    "img { max-width: 192px; max-height: 192px; }\n"
    ".q { color: #555; font-size: 0.85em; }\n"
    ".s { color: #777; font-size: 0.8em; }\n"
    "</style></head><body>\n"
    "<h1>{{ title }}</h1>\n"
    "<p>{{ description }}</p>\n"
    "<table><tr><th>model</th><th>n</th><th>ROUGE-L</th><th>token F1</th><th>exact match</th>"
    "{% if judged %}<th>judge: consistent</th>{% endif %}</tr>\n"
    "{% for name, m in metrics.items() %}<tr><td>{{ name }}</td><td>{{ m.n }}</td>"
    '<td>{{ "%.4f"|format(m.rouge_l) }}</td>\n'
    '<td>{{ "%.4f"|format(m.token_f1) }}</td><td>{{ "%.4f"|format(m.exact_match) }}</td>\n'
    "{% if judged %}"
    '<td>{{ "%.3f"|format(m.judge_consistent) if m.judge_consistent is not none else "-" }}</td>'
    "{% endif %}</tr>\n"
    "{% endfor %}</table>\n"
    "<table><tr><th>image</th><th>prompt</th><th>reference instruction</th>{% for name in models %}"
    "<th>{{ name }} answer</th>{% endfor %}</tr>\n"
    '{% for row in rows %}<tr><td><img src="{{ row.image }}" alt="case {{ loop.index }}"></td>\n'
    '<td>{{ row.prompt }}<div class="q">{{ row.question }}</div></td><td>{{ row.reference }}</td>\n'
    "{% for name in models %}"
    '<td>{{ row.answers[name].text }}<div class="s">ROUGE-L {{ "%.2f"|format(row.answers[name].rouge_l) }}'
    '{% if row.answers[name].judge is not none %}, judge: {{ "yes" if row.answers[name].judge else "no" }}'
    "{% endif %}</div></td>{% endfor %}\n"
    "</tr>{% endfor %}\n"
    "</table></body></html>\n"
)


def write_report(out_dir: str | Path, title: str, description: str, metrics: Mapping[str, Mapping[str, Any]],
                 cases: Sequence[Any], answers: Sequence[Mapping[str, Any]]) -> Path:
    """``answers[i][model]`` = ``{"text", "rouge_l", "judge"}`` for ``cases[i]``; returns index.html."""
    import jinja2

    out_dir = Path(out_dir)
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (case, row) in enumerate(zip(cases, answers, strict=True)):
        name = f"images/{i:04d}.jpg"
        thumb = case.image.copy()
        thumb.thumbnail((384, 384))
        with atomic_path(out_dir / name) as tmp:
            thumb.save(tmp, format="JPEG", quality=90)
        first: Mapping[str, Any] = next(iter(row.values()), {})
        rows.append({"image": name, "prompt": case.prompt, "reference": case.reference,
                     "question": first.get("question", ""), "answers": row})
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    html = env.from_string(_TEMPLATE).render(
        title=title, description=description, metrics=metrics, models=list(metrics), rows=rows,
        judged=any(m.get("judge_consistent") is not None for m in metrics.values()))
    return atomic_write(out_dir / "index.html", html)
