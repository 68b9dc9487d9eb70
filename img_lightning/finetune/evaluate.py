"""``img-finetune-mllm eval``: what the base and the finetuned MLLM answer, against the reference.

One run evaluates one dataset (``eval.source``): the held-out InstructPix2Pix triplets of the
config's ``data`` block (a fixed subset: held-out keys ordered by their sha256), or a SEED-Data-Edit
sample file (:mod:`.seed_edit`). Each case is asked exactly as the guidance encoder asks (same
question choice by key, conversation format, image preprocessing); answers are greedy. Written to
``eval.output`` (default ``RUN/eval/{source}``):

* ``metrics.json`` - ``{"base": {...}, "finetuned": {...}}``, each with ``rouge_l``, ``token_f1``,
  ``exact_match``, ``n`` (and ``judge_consistent``, ``judge_unparsed`` with the judge);
* ``answers.jsonl`` - per case: key, prompt, question, reference, each model's answer and scores;
* ``eval_info.json`` - the dataset, the models, skipped cases, the settings;
* ``index.html`` + ``images/`` - the side-by-side page.

The models are loaded one after the other (a 13B model each), on ``mllm.device``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, cast

import torch
from omegaconf import OmegaConf

from ..atomic import atomic_write, atomic_write_json
from ..config.encoders import MLLMConfig
from ..config.finetune_mllm import FinetuneDataConfig, FinetuneMLLMConfig
from ..config.loading import ConfigError, to_container
from ..encoders.export_manifest import MANIFEST_NAME, read_manifest, verify_export_weights, warn_if_trained_otherwise
from ..errors import UserError
from ..run_dir import run_directory
from .judge import Transport
from .metrics import aggregate, score
from .model import HFModel
from .samples import SampleEncoder
from .seed_edit import EvalCase, read_seed_edit_sample

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    out_dir: Path
    source: str
    n: int
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)


def _value(x: Any) -> str:
    return str(getattr(x, "value", x))


class HeldoutMismatchError(UserError, ValueError):
    """The eval config's held-out split is not the one the finetuned export was trained with."""


# -- cases ------------------------------------------------------------------------------------------
def check_heldout_split(data_cfg: FinetuneDataConfig, manifest: Optional[dict], folder: Path,
                        fingerprint: Optional[str] = None) -> None:
    """Refuse a held-out split other than the export's (its manifest's ``data`` block): another
    fraction, salt or data (fingerprint) would put training triplets among the held-out cases.
    ``fingerprint``: the index fingerprint of ``data.input`` (checked once the data is scanned)."""
    if manifest is None:
        log.warning("%s has no %s: cannot check that data.heldout_fraction/heldout_salt/input give the held-out "
                    "split it was trained with", folder, MANIFEST_NAME)
        return
    trained = manifest.get("data", {})
    where = folder / MANIFEST_NAME
    problems = []
    for key in ("heldout_fraction", "heldout_salt"):
        if key in trained and trained[key] != getattr(data_cfg, key):
            problems.append(f"data.{key}={getattr(data_cfg, key)!r} here, {trained[key]!r} in {where}")
    if fingerprint is not None and trained.get("fingerprint") and trained["fingerprint"] != fingerprint:
        problems.append(f"data.input={data_cfg.input} gives index fingerprint {fingerprint[:12]}..., the export was "
                        f"trained on {trained['fingerprint'][:12]}...")
    if problems:
        raise HeldoutMismatchError(
            "the held-out split is not the one the finetuned model was trained with (" + "; ".join(problems) +
            "): its held-out cases could be training samples. Evaluate with the data.input, data.heldout_fraction "
            "and data.heldout_salt of its training config, or a SEED-Data-Edit sample (eval.source=seed_data_edit)")


def heldout_cases(data_cfg: FinetuneDataConfig, limit: Optional[int], manifest: Optional[dict] = None,
                  folder: Optional[Path] = None) -> tuple[list[EvalCase], dict[str, int]]:
    """The held-out triplets of ``data`` (same split as training), ordered by sha256 of their key.
    With ``folder`` (the finetuned export) the split is checked against its ``manifest``."""
    from .triplets import CorruptImage, RowGroupImages, decode_image, scan_triplets

    if folder is not None:
        check_heldout_split(data_cfg, manifest, folder)  # before the scan: the cheap part
    index = scan_triplets(data_cfg.input, data_cfg.heldout_fraction, data_cfg.heldout_salt)
    if folder is not None and manifest is not None:
        check_heldout_split(data_cfg, manifest, folder, fingerprint=index.fingerprint)
    ids = sorted(index.heldout_ids.tolist(), key=lambda i: hashlib.sha256(index.keys[i].encode()).hexdigest())
    if not ids:
        raise UserError(f"data.input={data_cfg.input} has no held-out triplets at data.heldout_fraction="
                        f"{data_cfg.heldout_fraction}; raise it or evaluate a SEED-Data-Edit sample "
                        f"(eval.source=seed_data_edit eval.input=FILE)")
    images = RowGroupImages(index.files, capacity=max(1, int(data_cfg.row_group_cache)))
    cases: list[EvalCase] = []
    skipped = {"corrupt_image": 0}
    for i in ids:
        if limit is not None and len(cases) >= limit:
            break
        fi, rg, row = index.location(i)
        try:
            image = decode_image(images.image_bytes(fi, rg, row))
        except CorruptImage:
            skipped["corrupt_image"] += 1
            continue
        cases.append(EvalCase(key=index.keys[i], image=image, prompt=index.edited_prompt[i],
                              reference=index.instruction[i], original_prompt=index.original_prompt[i],
                              source=f"{index.files[fi]}:row_group={rg}:row={row}"))
    return cases, skipped


def load_cases(cfg: FinetuneMLLMConfig, finetuned: Optional[Path] = None) -> tuple[list[EvalCase], dict[str, int]]:
    """The cases of ``eval.source``; held-out ones are checked against the export ``finetuned``."""
    source = _value(cfg.eval.source)
    if source == "seed_data_edit":
        if not cfg.eval.input:
            raise ConfigError("eval.source=seed_data_edit needs eval.input=FILE (a .jsonl/.json SEED-Data-Edit sample)")
        return read_seed_edit_sample(cfg.eval.input, cfg.eval.image_root, cfg.eval.limit)
    manifest = read_manifest(finetuned) if finetuned is not None else None
    return heldout_cases(cfg.data, cfg.eval.limit, manifest, finetuned)


# -- generation -------------------------------------------------------------------------------------
def cut_answer(text: str, end_of_turn: Optional[str]) -> str:
    """The answer up to the conversation's end-of-turn text (``###`` of llava_v0, ``</s>``, EOS)."""
    if end_of_turn and end_of_turn in text:
        text = text[: text.index(end_of_turn)]
    return text.strip()


@torch.inference_mode()
def generate_answers(model: HFModel, encoder: SampleEncoder, cases: Sequence[EvalCase], *,
                     batch_size: int = 8, max_new_tokens: int = 64, progress: bool = False) -> list[dict[str, Any]]:
    """Greedy answers (left-padded batches) -> ``[{"text", "question_index", "question"}]``."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    tokenizer = encoder.tokenizer
    stop = encoder.end_of_turn
    out: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cases), desc="answers", unit="case", leave=False)
    for start in range(0, len(cases), batch_size):
        chunk = cases[start : start + batch_size]
        samples = [encoder.encode_prompt(c.key, c.image, c.prompt) for c in chunk]
        batch = encoder.collate(samples, padding_side="left")
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        extra = {"stop_strings": [stop], "tokenizer": tokenizer} if stop and stop != tokenizer.eos_token else {}
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                   pad_token_id=encoder.pad_id, eos_token_id=tokenizer.eos_token_id, **extra)
        new = generated[:, inputs["input_ids"].shape[1]:]
        for case, sample, ids in zip(chunk, samples, new.tolist(), strict=True):
            text = cut_answer(tokenizer.decode(ids, skip_special_tokens=True), stop)
            out.append({"text": text, "question_index": sample.question_index,
                        "question": encoder.questions.question(case.prompt, sample.question_index)})
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return out


def model_answers(mllm_cfg: MLLMConfig, cases: Sequence[EvalCase], cfg: FinetuneMLLMConfig,
                  progress: bool) -> list[dict[str, Any]]:
    """Load one model (``mllm_cfg``), answer every case, free the model."""
    from ..encoders.mllm import load_mllm_model, mllm_folder
    from ..models import compute_dtype, resolve_device

    folder = mllm_folder(mllm_cfg, key="mllm")
    device = resolve_device(str(mllm_cfg.device))
    model = load_mllm_model(mllm_cfg, folder, compute_dtype(str(mllm_cfg.dtype), device), device)
    model = model.to(device).eval()
    encoder = SampleEncoder.from_config(mllm_cfg, max_length=10**9)
    try:
        return generate_answers(model, encoder, cases, batch_size=int(cfg.eval.batch_size),
                                max_new_tokens=int(cfg.eval.max_new_tokens), progress=progress)
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def finetuned_config(cfg: FinetuneMLLMConfig) -> MLLMConfig:
    """The ``mllm`` block pointed at the export (``eval.finetuned``, default ``RUN/export``)."""
    folder = Path(cfg.eval.finetuned) if cfg.eval.finetuned else run_directory(cfg.run) / "export"
    if not (folder / "config.json").is_file():
        raise UserError(f"no finetuned export at {folder} (train first, or set eval.finetuned=EXPORT_DIR)")
    mllm = cast(MLLMConfig, OmegaConf.create(to_container(cfg.mllm)))
    mllm.path = str(folder)
    return mllm


# -- the run ----------------------------------------------------------------------------------------
def run_eval(cfg: FinetuneMLLMConfig, judge_transport: Optional[Transport] = None,
             progress: bool = False) -> EvalResult:
    from ..job import apply_torch_threads

    apply_torch_threads(cfg.run.torch_threads)
    source = _value(cfg.eval.source)
    out_dir = Path(cfg.eval.output) if cfg.eval.output else run_directory(cfg.run) / "eval" / source
    models = {"finetuned": finetuned_config(cfg)}
    finetuned = Path(str(models["finetuned"].path))
    verify_export_weights(finetuned)  # the weights scored are the ones the manifest lists
    warn_if_trained_otherwise(models["finetuned"], finetuned)  # prompt format, image mode, question file
    if cfg.eval.base:
        models = {"base": cast(MLLMConfig, OmegaConf.create(to_container(cfg.mllm))), **models}
    cases, skipped = load_cases(cfg, finetuned)
    if not cases:
        raise UserError(f"no usable evaluation cases ({source}; skipped: {skipped})")
    log.info("evaluating %d cases (%s) with %s", len(cases), source, ", ".join(models))
    answers = {name: model_answers(m, cases, cfg, progress) for name, m in models.items()}
    judge = None
    if cfg.eval.judge.enabled:
        from .judge import Judge

        judge = Judge(cfg.eval.judge, transport=judge_transport)
    rows: list[dict[str, dict[str, Any]]] = []
    for i, case in enumerate(cases):
        row = {}
        for name in models:
            a = answers[name][i]
            verdict = judge.ask(case.reference, a["text"]) if judge is not None else None
            row[name] = {**a, **score(a["text"], case.reference),
                         "judge": verdict.consistent if verdict is not None else None,
                         "judge_reply": verdict.reply if verdict is not None else None}
        rows.append(row)
    metrics = {}
    for name in models:
        per_case = [r[name] for r in rows]
        m: dict[str, Any] = aggregate(per_case)
        verdicts = [r["judge"] for r in per_case if r["judge"] is not None]
        m["judge_consistent"] = (sum(verdicts) / len(verdicts)) if verdicts else None
        m["judge_unparsed"] = sum(1 for r in per_case if r["judge_reply"] is not None and r["judge"] is None) \
            if judge is not None else None
        metrics[name] = m
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "metrics.json", metrics)
    lines = [{"key": c.key, "source": c.source, "prompt": c.prompt, "original_prompt": c.original_prompt,
              "reference": c.reference, **{name: row[name] for name in models}}
             for c, row in zip(cases, rows, strict=True)]
    atomic_write(out_dir / "answers.jsonl", "".join(_json_line(x) for x in lines))
    atomic_write_json(out_dir / "eval_info.json", {
        "source": source, "input": cfg.eval.input if source == "seed_data_edit" else cfg.data.input,
        "n": len(cases), "skipped": skipped, "models": {k: str(v.path or v.model) for k, v in models.items()},
        "eval": to_container(cfg.eval), "mllm": to_container(cfg.mllm)})
    from .report import write_report

    write_report(out_dir, f"MLLM finetuning: {source} ({len(cases)} cases)",
                 f"Greedy answers to the misalignment question, against the reference edit instruction. "
                 f"Models: {', '.join(f'{k} = {v.path or v.model}' for k, v in models.items())}.",
                 metrics, cases, rows)
    return EvalResult(out_dir=out_dir, source=source, n=len(cases), metrics=metrics, skipped=skipped)


def _json_line(obj: Any) -> str:
    import json

    return json.dumps(obj, ensure_ascii=False) + "\n"
