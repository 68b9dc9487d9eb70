"""Loaders for the official prompt files of the benchmarks in the IMG paper.

Each loader reads the file exactly as its authors ship it (quirks included: PartiPrompts' literal
double quotes, CRLF line ends, missing final newlines, a UTF-8 BOM, the malformed HPD csv) and
returns :class:`~img_lightning.eval_run.prompts.PromptRecord` s with a stable ``uid``. The uid (not
the row position in a filtered list) names every image and seeds it, so a chunk of a SLURM array or
a resumed run produces exactly the images of a single full run.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

from ..config.eval import EvalConfig
from ..config.loading import ConfigError
from ..errors import UserError
from ..eval_run.prompts import PromptRecord


class PromptFileError(UserError, ValueError):
    """A prompt file that cannot be read; the message names the file (and row) and what to do."""


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise PromptFileError(f"{what} not found: {path} (give the path of the official file)")
    return path


def _read_text(path: Path) -> str:
    try:
        # utf-8-sig drops a BOM when there is one and is plain UTF-8 otherwise.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise PromptFileError(f"{path}: not UTF-8 text ({err})") from None


def _lines(path: Path) -> list[str]:
    """Non-blank lines without their line ends; ``splitlines`` handles CRLF and no final newline."""
    return [line.strip() for line in _read_text(path).splitlines() if line.strip()]


def _uid(index: int) -> str:
    return f"{index:05d}"


# ---------------------------------------------------------------------------------- plain text
def load_text(path: str | Path) -> list[PromptRecord]:
    """One prompt per line; blank lines skipped; uid = 0-based index of the kept line."""
    path = _require_file(Path(path), "prompt file")
    return [PromptRecord(_uid(i), text) for i, text in enumerate(_lines(path))]


# ---------------------------------------------------------------------------------- PartiPrompts
def load_partiprompts(path: str | Path) -> list[PromptRecord]:
    """``PartiPrompts.tsv`` (Prompt, Category, Challenge, Note).

    ``QUOTE_NONE``: the default quoting would eat the literal quotes of ``"G I G G L E" painted ...``.
    """
    path = _require_file(Path(path), "PartiPrompts.tsv")
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or [c.strip() for c in rows[0][:2]] != ["Prompt", "Category"]:
        raise PromptFileError(f"{path}: expected the PartiPrompts header 'Prompt<TAB>Category<TAB>...'")
    header = [c.strip() for c in rows[0]]
    out = []
    for i, row in enumerate(rows[1:]):
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise PromptFileError(f"{path}, line {i + 2}: {len(row)} columns, header has {len(header)}")
        rec = dict(zip(header, (c.strip() for c in row), strict=True))
        out.append(
            PromptRecord(
                _uid(i),
                rec["Prompt"],
                category=rec["Category"],
                meta={"challenge": rec.get("Challenge", ""), "note": rec.get("Note", "")},
            )
        )
    return out


# ---------------------------------------------------------------------------------- DrawBench
def load_drawbench(path: str | Path) -> list[PromptRecord]:
    """DrawBench CSV with header ``Prompts,Category`` (standard CSV quoting)."""
    path = _require_file(Path(path), "DrawBench csv")
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "Prompts" not in reader.fieldnames:
            raise PromptFileError(f"{path}: expected a 'Prompts,Category' header, got {reader.fieldnames}")
        out = []
        for i, row in enumerate(reader):
            text = (row.get("Prompts") or "").strip()
            raw_cat = row.get("Category") or ""
            # "Gary Marcus et al. " carries a trailing space in the file; keep it in meta only.
            out.append(PromptRecord(_uid(i), text, category=raw_cat.strip(), meta={"category_raw": raw_cat}))
    return out


# ---------------------------------------------------------------------------------- HPD v2
def load_hpd_benchmark(path: str | Path) -> list[PromptRecord]:
    """HPS v2 benchmark style files as ``hpsv2`` ships them: one JSON list of prompt strings per
    style (``anime.json``, ``concept-art.json``, ``paintings.json``, ``photo.json``; optionally
    ``drawbench.json``). ``path`` is one such file or a directory of them; category = file stem and
    uid = ``{style}-{index}``."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise PromptFileError(f"{path}: no *.json style files (anime.json, photo.json, ...) in it")
    else:
        files = [_require_file(path, "HPD v2 benchmark json")]
    out: list[PromptRecord] = []
    for file in files:
        try:
            data = json.loads(_read_text(file))
        except json.JSONDecodeError as err:
            raise PromptFileError(f"{file}: not valid JSON ({err})") from None
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise PromptFileError(f"{file}: expected a JSON list of prompt strings")
        style = file.stem
        out.extend(PromptRecord(f"{style}-{_uid(i)}", p.strip(), category=style) for i, p in enumerate(data))
    return out


def load_hpd_csv(path: str | Path) -> list[PromptRecord]:
    """``HPD_prompt.csv``: header claims 4 columns but rows are ``id,caption`` with unquoted commas
    inside the caption, so each line is split on its FIRST comma only."""
    path = _require_file(Path(path), "HPD prompt csv")
    lines = _read_text(path).splitlines()
    out = []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        uid, sep, caption = line.partition(",")
        if not sep or not uid.strip():
            raise PromptFileError(f"{path}, line {n}: expected 'id,caption'")
        out.append(PromptRecord(uid.strip(), caption.strip()))
    return out


# ---------------------------------------------------------------------------------- Pick-a-Pic
def load_pickapic(path: str | Path, unique: bool = True) -> list[PromptRecord]:
    """Pick-a-Pic test captions: a CSV with a ``caption`` column (the 500-prompt file: BOM, first
    column = id) or a Pick-a-Pic parquet (one row per image pair; captions de-duplicated in order
    of first appearance when ``unique``). The empty caption in the official test file is kept: it is
    one of the 500 prompts."""
    path = _require_file(Path(path), "Pick-a-Pic caption file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        schema = pq.read_schema(path)
        if "caption" not in schema.names:
            raise PromptFileError(f"{path}: parquet has no 'caption' column (columns: {schema.names})")
        captions = pq.read_table(path, columns=["caption"]).column("caption").to_pylist()
        seen: set[str] = set()
        out = []
        for i, cap in enumerate(captions):
            cap = (cap or "").strip()
            if unique and cap in seen:
                continue
            seen.add(cap)
            out.append(PromptRecord(_uid(i), cap))
        return out
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    if not rows or "caption" not in [c.strip() for c in rows[0]]:
        raise PromptFileError(f"{path}: expected a header with a 'caption' column")
    header = [c.strip() for c in rows[0]]
    col = header.index("caption")
    out = []
    for i, row in enumerate(rows[1:]):
        if not row:
            continue
        if len(row) <= col:
            raise PromptFileError(f"{path}, row {i + 2}: no caption column")
        first = row[0].strip()
        uid = first if col != 0 and first.isdigit() else _uid(i)
        out.append(PromptRecord(uid, row[col].strip()))
    return out


# ---------------------------------------------------------------------------------- T2I-CompBench
COMPLEX_SUBSET_FILES = {
    "spatial": "complex_val_spatial.txt",
    "action": "complex_val_action.txt",
}


def compbench_category(path: Path) -> str:
    """``color_val.txt`` -> ``color``; ``color_val.pre-3310c2f.txt`` -> ``color``."""
    name = path.name
    return name.split("_val")[0] if "_val" in name else path.stem


def _complex_key(text: str) -> str:
    # The matching rule of T2I-CompBench's 3_in_1.py: text before the first '.', lower-cased.
    return text.split(".")[0].strip().lower()


# The six categories of T2I-CompBench (and of Diffusion-Sharpening's Table 1), in table order.
T2I_COMPBENCH_CATEGORIES = ("color", "shape", "texture", "spatial", "non_spatial", "complex")


def load_t2i_compbench(path: str | Path, subset_dir: Optional[str | Path] = None) -> list[PromptRecord]:
    """A T2I-CompBench ``{category}_val.txt`` (CRLF, some without a final newline), or the dataset
    directory holding all six ``{category}_val.txt`` (uids ``{category}-NNNNN``, so one run covers
    every category; scorers pick theirs with ``categories``).

    For ``complex_val.txt`` every prompt gets the subtype that decides its 3-in-1 formula, read from
    ``complex_val_spatial.txt`` and ``complex_val_action.txt`` (beside the file, or in
    ``subset_dir``): spatial, action, or spatial_action (in neither list), as ``3_in_1.py`` does.
    """
    if Path(path).is_dir():
        out = []
        for cat in T2I_COMPBENCH_CATEGORIES:
            recs = load_t2i_compbench(_require_file(Path(path) / f"{cat}_val.txt", "T2I-CompBench prompt file"),
                                      subset_dir)
            out += [PromptRecord(f"{cat}-{r.uid}", r.text, r.category, r.subtype, r.meta) for r in recs]
        return out
    path = _require_file(Path(path), "T2I-CompBench prompt file")
    category = compbench_category(path)
    texts = _lines(path)
    subtypes: list[Optional[str]] = [None] * len(texts)
    if category == "complex":
        where = Path(subset_dir) if subset_dir else path.parent
        keys = {}
        for subtype, fname in COMPLEX_SUBSET_FILES.items():
            sub = where / fname
            if not sub.is_file():
                raise PromptFileError(
                    f"{path}: the complex category needs {fname} beside it (or set subset_dir) to pick "
                    f"each prompt's 3-in-1 formula; not found: {sub}"
                )
            keys[subtype] = {_complex_key(t) for t in _lines(sub)}
        for i, t in enumerate(texts):
            k = _complex_key(t)
            subtypes[i] = "spatial" if k in keys["spatial"] else "action" if k in keys["action"] else "spatial_action"
    return [PromptRecord(_uid(i), t, category=category, subtype=s)
            for i, (t, s) in enumerate(zip(texts, subtypes, strict=True))]


# ---------------------------------------------------------------------------------- dispatch
LOADERS: dict[str, Callable[..., list[PromptRecord]]] = {
    "text": load_text,
    "partiprompts": load_partiprompts,
    "drawbench": load_drawbench,
    "hpd_benchmark": load_hpd_benchmark,
    "hpd_csv": load_hpd_csv,
    "pickapic": load_pickapic,
    "t2i_compbench": load_t2i_compbench,
}


def load_prompts(
    fmt: str,
    path: str | Path,
    *,
    categories: Sequence[str] = (),
    limit: Optional[int] = None,
    **options: Any,
) -> list[PromptRecord]:
    """Load a prompt set by format name, keep ``categories`` (if given), then the first ``limit``."""
    if fmt not in LOADERS:
        raise PromptFileError(f"unknown prompt format '{fmt}'; choose one of {sorted(LOADERS)}")
    records = LOADERS[fmt](path, **options)
    if categories:
        wanted = set(categories)
        records = [r for r in records if r.category in wanted]
    uids = [r.uid for r in records]
    if len(set(uids)) != len(uids):
        dup = next(u for u in uids if uids.count(u) > 1)
        raise PromptFileError(f"{path}: prompt id '{dup}' occurs more than once; ids name the images")
    if limit is not None:
        records = records[:limit]
    return records


def load_prompt_set(cfg: EvalConfig) -> list[PromptRecord]:
    """The configured prompt set (``prompts.*``); an empty selection is an error."""
    p = cfg.prompts
    options = {"subset_dir": p.subset_dir} if p.format == "t2i_compbench" and p.subset_dir else {}
    prompts = load_prompts(p.format, p.path, categories=list(p.categories), limit=p.limit, **options)
    if not prompts:
        raise ConfigError(f"no prompts left in {p.path} after prompts.categories/prompts.limit")
    return prompts
