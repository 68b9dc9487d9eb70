"""The ``generate`` stage: base images, IMG rounds and the control arm, batched and resumable.

Arms (folders under ``{run}/images/``), all with ``generation.sampler`` and one seed per prompt:
- ``base``: the pipeline alone (no IP-Adapter) with ``generation.base`` (the demos' plain call);
- ``img_r{r}``: round r of IMG, regenerated from round r-1's image (round 0 = base) with the same
  prompt and seed, conditioned on the aligned IP tokens at ``img.ip_scale``, with the
  re-generation settings of ``img`` (negative prompt, negative IP image and scale);
- ``control``: exactly the re-generation settings at IP scale 0, so base -> control isolates any
  effect of those settings (negative prompt, FLUX's negative IP pass, adapter layers) from IMG's.
  With the released SDXL settings nothing else differs, so control is base: its images are then
  copies of base's (``reused_from: base`` in their metadata; :func:`.provenance.same_images_as`),
  not generated again.
Each image is made by :class:`~.generator.IMGGenerator` (the steps ``img-generate`` runs too); this
module stores them and skips what is done. Round r computes its features from round r-1's stored
image: a PNG, i.e. exactly the generated 8-bit RGB image the released demos hand to the MLLM and the
IP encoder (lossy formats are refused for IMG runs). Aligned tokens are saved per image under
``{run}/features/img_r{r}/`` (safetensors), so a resumed run does not reload the MLLM for images
whose features exist; they are reused only when made from the same prompt, question, source image
(sha256), aligner checkpoint (sha256) and passes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..aligner import ImplicitAligner
from ..atomic import atomic_path
from ..config.eval import EvalConfig
from ..eval_run import ImageStore, PromptRecord, arm_names, chunk_tag, img_arm, safe_uid, source_arm
from ..hashing import file_sha256_once
from .generator import IMGGenerator, enum_value
from .provenance import aligner_sha256, common_meta, img_meta, regen_meta, same_images_as
from .requirements import check_generation_config
from .seeds import seed_for

_FEATURE_FIELDS = ("prompt", "template_id", "source_arm", "source_sha256", "passes", "aligner_sha256")


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)


class GenerationRun(IMGGenerator):
    """:class:`IMGGenerator` over a prompt set, storing every arm's images in a run directory."""

    def __init__(self, cfg: EvalConfig, prompts: Sequence[PromptRecord], run_dir: str | Path, progress: bool = True,
                 aligner: Optional[ImplicitAligner] = None) -> None:
        """``aligner``: the configured one, already loaded (by the checks before the run); else it is
        loaded when the first IMG round needs it."""
        super().__init__(cfg, aligner)
        self.prompts = list(prompts)
        self.by_uid = {p.uid: p for p in self.prompts}
        self.run_dir = Path(run_dir)
        self.progress = progress
        check_generation_config(cfg)
        tag = chunk_tag(cfg)
        arms = arm_names(cfg.img.rounds, cfg.img.control)
        self.stores = {a: ImageStore(self.run_dir, a, tag, cfg.generation.image_format) for a in arms}
        self.counts = {a: 0 for a in arms}
        self.reused: dict[str, str] = {}  # arm -> the arm whose images it took (this call)
        self._aligner_hash: Optional[str] = None

    # ------------------------------------------------------------------ helpers
    def seed(self, uid: str) -> int:
        return seed_for(uid, self.cfg.generation.seed)

    def _texts_seeds(self, uids: Sequence[str]) -> tuple[list[str], list[int]]:
        return [self.by_uid[u].text for u in uids], [self.seed(u) for u in uids]

    def _batches(self, uids: list[str], size: int, desc: str) -> Iterator[list[str]]:
        steps = range(0, len(uids), size)
        bar = tqdm(steps, desc=desc, unit="batch", disable=not self.progress)
        for i in bar:
            yield uids[i : i + size]

    def _meta(self, uid: str, **extra: Any) -> dict[str, Any]:
        return {**common_meta(self.cfg, self.by_uid[uid].text, self.seed(uid)), **extra}

    @property
    def aligner_hash(self) -> Optional[str]:
        if self._aligner_hash is None:
            self._aligner_hash = aligner_sha256(self.cfg)
        return self._aligner_hash

    def feature_path(self, arm: str, uid: str) -> Path:
        return self.run_dir / "features" / arm / f"{safe_uid(uid)}.safetensors"

    def _feature_meta(self, arm: str, uid: str) -> dict[str, str]:
        """What a stored feature file must have been made from to be reused (else it is recomputed):
        the prompt, the question, the source image's content, the aligner checkpoint and its passes."""
        round_index = int(arm.removeprefix("img_r"))
        src = source_arm(round_index)
        prompt = self.by_uid[uid].text
        return {"prompt": prompt, "template_id": str(self.question(prompt, self.seed(uid), round_index)),
                "source_arm": src, "source_sha256": file_sha256_once(self.stores[src].path_for(uid)),
                "passes": str(self.cfg.img.aligner.passes), "aligner_sha256": str(self.aligner_hash)}

    def _stored_feature_meta(self, arm: str, uid: str) -> Optional[dict[str, Optional[str]]]:
        path = self.feature_path(arm, uid)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return {k: meta.get(k) for k in _FEATURE_FIELDS}

    def unconditional(self) -> torch.Tensor:
        """The re-generation's negative IP tokens, computed once per run (kept in the run folder)."""
        mode = enum_value(self.cfg.img.negative_ip_image)
        path = self.run_dir / "features" / f"unconditional_{mode}.safetensors"
        if self._uncond is None and path.is_file():
            self._uncond = load_file(str(path))["tokens"]
        if self._uncond is None:
            tokens = super().unconditional()  # kept as self._uncond
            _save_tensors(path, {"tokens": tokens}, {"source": f"IPEncoder.unconditional({mode!r})"})
            return tokens
        return self._uncond

    def _release_encoders(self) -> None:
        if self.cfg.img.free_encoders:
            self.release_encoders()

    # ------------------------------------------------------------------ stages
    def run_base(self) -> None:
        store = self.stores["base"]
        pending = store.pending([p.uid for p in self.prompts])
        g = self.cfg.generation
        for batch in self._batches(pending, g.pipeline.batch_size, "base"):
            for u, im in zip(batch, self.base(*self._texts_seeds(batch)), strict=True):
                store.save(u, im, self._meta(u, negative_prompt=g.base.negative_prompt, ip_scale=None))
                self.counts["base"] += 1

    def _features(self, round_index: int, uids: list[str]) -> None:
        """Aligned tokens for every uid of this round that has none on disk yet."""
        arm, src = img_arm(round_index), source_arm(round_index)
        need = [u for u in uids if self._feature_meta(arm, u) != self._stored_feature_meta(arm, u)]
        size = max(1, int(self.cfg.encoders.mllm.batch_size))
        for batch in self._batches(need, size, f"{arm} features"):
            images = [self.stores[src].load(u) for u in batch]
            ip, aligned, _ = self.align(images, *self._texts_seeds(batch), round_index)
            for j, u in enumerate(batch):
                meta = {"aligner": str(self.cfg.img.aligner.checkpoint), **self._feature_meta(arm, u)}
                _save_tensors(self.feature_path(arm, u), {"ip": ip[j], "aligned": aligned[j]}, meta)

    def run_img_round(self, round_index: int) -> None:
        arm = img_arm(round_index)
        store = self.stores[arm]
        pending = store.pending([p.uid for p in self.prompts])
        if not pending:
            return
        self.ensure_adapter()
        self.unconditional()
        self._features(round_index, pending)
        self._release_encoders()
        for batch in self._batches(pending, self.cfg.generation.pipeline.batch_size, arm):
            feats = [load_file(str(self.feature_path(arm, u))) for u in batch]
            tokens = torch.stack([f["aligned"] for f in feats])
            images = self.regenerate(*self._texts_seeds(batch), tokens, self.cfg.img.ip_scale)
            for u, im in zip(batch, images, strict=True):
                stored = self._stored_feature_meta(arm, u)
                assert stored is not None and stored["template_id"] is not None  # written by _features above
                extra = {"template_id": int(stored["template_id"])}
                store.save(u, im, {**self._meta(u, **img_meta(self.cfg, round_index, self.aligner_hash)), **extra})
                self.counts[arm] += 1

    def run_control(self) -> None:
        store = self.stores["control"]
        pending = store.pending([p.uid for p in self.prompts])
        if not pending:
            return
        source = same_images_as(self.cfg, "control")
        if source is not None:  # byte copies of images already made (run_base ran first)
            for u in pending:
                store.save_copy(u, self.stores[source].path_for(u),
                                self._meta(u, **regen_meta(self.cfg, 0.0), reused_from=source))
                self.counts["control"] += 1
            self.reused["control"] = source
            return
        self.ensure_adapter()
        self.unconditional()
        self._release_encoders()
        for batch in self._batches(pending, self.cfg.generation.pipeline.batch_size, "control"):
            for u, im in zip(batch, self.control(*self._texts_seeds(batch)), strict=True):
                store.save(u, im, self._meta(u, **regen_meta(self.cfg, 0.0)))
                self.counts["control"] += 1

    def run(self) -> dict[str, int]:
        """All stages in order; returns how many images each arm generated in this call."""
        self.run_base()
        for r in range(1, self.cfg.img.rounds + 1):
            self.run_img_round(r)
        if self.cfg.img.control:
            self.run_control()
        self.close()
        return self.counts
