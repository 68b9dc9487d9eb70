"""img-preprocess with the released pipeline's MLLM side: an original-format LLaVA converted by
img-convert-llava, the llava_v0 conversation and a question file. Each sample records the exact
MLLM text, the question index and the question file's hash; captions holding the image
placeholder are skipped and counted."""

import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from img_lightning.cache import Manifest
from img_lightning.cache.format import decode_tensors
from img_lightning.config.loading import load_config
from img_lightning.config.preprocess import PreprocessConfig
from img_lightning.convert.llava import convert_llava
from img_lightning.encoders.questions import load_question_file
from img_lightning.recipe import cache_key_of
from img_lightning.tiny.llava_original import build_tiny_clip_tower, build_tiny_llava_original
from preprocessing.demo_data import write_demo_parquet
from preprocessing.extract import FeatureExtractor
from preprocessing.pickapic import ImageFetcher, decode_image, scan_pairs
from preprocessing.run import run_preprocess

QUESTIONS = ["What should change so that the picture shows {prompt}?",
             "Describe the edits that turn this image into: {prompt}",
             "Compare with the text \"{prompt}\" - what differs?"]


@pytest.fixture(scope="module")
def released_llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    tower = build_tiny_clip_tower(root / "clip")
    src = build_tiny_llava_original(root / "llava", tower)
    return convert_llava(src, root / "llava-hf").dst


@pytest.fixture(scope="module")
def parquet_with_bad_caption(tmp_path_factory):
    path = tmp_path_factory.mktemp("pickapic") / "demo.parquet"
    write_demo_parquet(path, 10, seed=2)
    table = pq.read_table(path)
    captions = table.column("caption").to_pylist()
    captions[0] = "a red square <image> on white"
    table = table.set_column(table.schema.get_field_index("caption"), "caption", pa.array(captions))
    pq.write_table(table, path)
    return path


def test_cache_records_mllm_prompt_and_question_file(tmp_path, released_llava, parquet_with_bad_caption,
                                                     tiny_ip_adapter_dir):
    questions = tmp_path / "edit_instructions.json"
    questions.write_text(json.dumps(QUESTIONS))
    qs = load_question_file(questions)
    cfg = load_config(PreprocessConfig, ["configs/preprocess/demo.yaml"], [
        f"data.input={parquet_with_bad_caption}", f"data.output={tmp_path / 'cache'}",
        "encoders.mllm.model=test/tiny-img-llava", f"encoders.mllm.path={released_llava}",
        f"encoders.mllm.questions={questions}", "encoders.mllm.prompt_format=llava_v0",
        f"encoders.ip.image_encoder_path={tiny_ip_adapter_dir}", f"encoders.ip.adapter_path={tiny_ip_adapter_dir}",
        "cache.shard_size=4", "encoders.mllm.batch_size=3"])
    extractor = FeatureExtractor.from_config(cfg.encoders)
    result = run_preprocess(cfg, progress=False, extractor=extractor)
    manifest = Manifest.load(tmp_path / "cache")
    assert result.manifest is not None and manifest.cache_key == cache_key_of(cfg)
    assert manifest.recipe["encoders"]["mllm"]["questions_sha256"] == qs.sha256
    summary = json.loads((tmp_path / "cache" / "summary.json").read_text())
    assert summary["bad_prompts"] == 1 and summary["bad_images"] == 1 and summary["written"] == 9
    reports = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "reports").glob("*.json")]
    bad = [s for r in reports for s in r["skipped"] if s["kind"] == "bad_prompt"]
    assert len(bad) == 1 and "<image>" in bad[0]["reason"]

    table = scan_pairs(str(parquet_with_bad_caption))
    row_of = {pid: i for i, pid in enumerate(table.pair_id)}
    fetcher = ImageFetcher(table)
    seen = 0
    for shard in manifest.shards:
        with tarfile.open(tmp_path / "cache" / shard.name) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for name, raw in members.items():
            if not name.endswith(".json"):
                continue
            meta = json.loads(raw)
            tid = qs.index_for(meta["pair_id"])
            question = QUESTIONS[tid].replace("{prompt}", meta["caption"])
            assert meta["template_id"] == tid and meta["template_set"] == "edit_instructions.json"
            assert meta["questions_sha256"] == qs.sha256
            assert meta["mllm_prompt"] == (
                "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the human's questions.###Human: <image>\n"
                f"{question}###Assistant:")
            if seen < 3:  # the stored features are the encoder's for that text and the losing image
                lose = decode_image(fetcher.fetch([row_of[meta["pair_id"]]])[0][1])[0]
                want = extractor.mllm.encode([lose], [meta["caption"]], [tid])[0]
                stored = decode_tensors(bytearray(members[name[:-5] + ".safetensors"]))["guidance"]
                torch.testing.assert_close(stored.float(), want, rtol=2e-3, atol=2e-3)
            seen += 1
    assert seen == 9
