"""The Diffusion-Sharpening benchmark config: Table 1's columns in order from one run's scorers,
built on the tiny models, over the six T2I-CompBench categories loaded from the dataset directory."""

from PIL import Image

from bench_paths import BENCH, requires_bench
from img_lightning.evaluation.pipeline import resolve_config
from img_lightning.evaluation.prompts import T2I_COMPBENCH_CATEGORIES, load_prompt_set
from img_lightning.evaluation.scorers import build_scorers
from img_lightning.tiny.demo_eval import DEMO_CONFIG

pytestmark = requires_bench
CONFIG = DEMO_CONFIG.parent / "benchmarks" / "diffusion_sharpening.yaml"
TABLE_1 = ["CLIP Score", "Color", "Shape", "Texture", "Spatial", "Non-Spatial", "Complex", "Aesthetic", "ImageReward",
           "MLLM"]


def test_diffusion_sharpening_columns_from_one_config(tiny_scorer_dirs, tiny_llava_dir, tmp_path):
    d = tiny_scorer_dirs
    dataset = BENCH / "t2i-compbench"
    cfg = resolve_config([
        str(DEMO_CONFIG), str(CONFIG), f"run_dir={tmp_path}", f"prompts.path={dataset}", "img.aligner.checkpoint=x.pth",
        "prompts.limit=null",
        *[f"scorers.{i}.path={d['clip']}" for i in (0, 5, 7)],
        *[f"scorers.{i}.path={d['blip_vqa']}" for i in (1, 2, 3)],
        f"scorers.4.path={d['owlvit']}", f"scorers.7.checkpoint={d['aesthetic_mlp']}",
        f"scorers.8.checkpoint={d['image_reward_checkpoint']}",
        f"scorers.8.processor_path={d['image_reward_tokenizer']}",
        "scorers.9.mllm.backend=llava", f"scorers.9.mllm.path={tiny_llava_dir}", "scorers.9.max_new_tokens=4",
        *[f"scorers.{i}.device=cpu" for i in range(10)], "scorers.9.mllm.device=cpu", "scorers.9.mllm.dtype=float32",
        "scorers.9.mllm.image_mode=pad",
    ])
    assert [s.label for s in cfg.scorers] == TABLE_1
    assert cfg.scorers[6].subset_dir == str(dataset)  # ${prompts.path}: the complex subtype lists
    prompts = load_prompt_set(cfg)
    by_cat = {c: [p for p in prompts if p.category == c] for c in T2I_COMPBENCH_CATEGORIES}
    assert all(len(v) == 300 for v in by_cat.values()) and len({p.uid for p in prompts}) == 1800
    assert by_cat["complex"][0].uid == "complex-00000" and by_cat["complex"][0].subtype

    scorers = build_scorers(cfg.scorers)
    assert [s.label for s in scorers.values()] == TABLE_1
    assert scorers["color"].model is scorers["shape"].model is scorers["texture"].model  # one BLIP-VQA loaded
    assert scorers["clip_score"].describe()["scale"] == "1.0 x cos"
    ims = [Image.new("RGB", (48, 40), (200, 40, 40)), Image.new("RGB", (40, 48), (40, 40, 200))]
    for name, s in scorers.items():
        cats = list(cfg.scorers[list(scorers).index(name)].categories)
        texts = [p.text for p in (by_cat[cats[0]] if cats else prompts)[:2]]
        out = s.score(ims, texts)
        assert out.shape == (2,), name
