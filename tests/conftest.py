"""Shared test setup: offline Hugging Face, tiny models built once per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import logging  # noqa: E402

import pytest  # noqa: E402


# -- opt-in tests --------------------------------------------------------------------------------
# `real_width` tests build ~5 GB of real-width models and run every stage on them (minutes, ~8 GiB):
# not part of the README's `python -m pytest -q`; run them with `--real-width` (or IMG_REAL_WIDTH=1).
def pytest_addoption(parser):
    parser.addoption("--real-width", action="store_true", default=False,
                     help="also run the tests marked real_width (the real-width world, minutes)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--real-width") or os.environ.get("IMG_REAL_WIDTH") == "1":
        return
    skip = pytest.mark.skip(reason="real-width run: opt in with `pytest --real-width` (or IMG_REAL_WIDTH=1)")
    for item in items:
        if "real_width" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _our_logs_reach_caplog():
    """A CLI run inside a test detaches our loggers from the root (they print through their own
    handler); reattach them so every test's ``caplog`` sees our records."""
    from img_lightning.cli.common import OUR_LOGGERS

    for name in OUR_LOGGERS:
        logging.getLogger(name).propagate = True
    yield


# -- tiny models in the real on-disk formats (img_lightning/tiny) -------------------------------
@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    from img_lightning.tiny.sdxl import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny") / "sdxl")


@pytest.fixture(scope="session")
def tiny_ip_adapter_dir(tmp_path_factory, tiny_sdxl_dir):
    """h94/IP-Adapter layout: sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors + models/image_encoder."""
    from img_lightning.tiny.ip_adapter import build_tiny_ip_adapter_plus_sdxl

    return build_tiny_ip_adapter_plus_sdxl(tmp_path_factory.mktemp("tiny") / "ip_adapter", tiny_sdxl_dir)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    from img_lightning.tiny.mllm import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny") / "llava")


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    from img_lightning.tiny.mllm import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny") / "qwen2_5_vl")


@pytest.fixture(scope="session")
def tiny_scorer_dirs(tmp_path_factory):
    """Tiny HPS (open_clip + {"state_dict"} checkpoint), CLIP, BLIP-VQA and OWL-ViT (evaluation tests)."""
    from img_lightning.tiny.scorers import build_tiny_scorers

    return build_tiny_scorers(tmp_path_factory.mktemp("tiny") / "scorers")


@pytest.fixture(scope="session")
def tiny_aligner(tmp_path_factory):
    """A tiny aligner for the tiny LLaVA (64-wide guidance) and IP tokens [16, 64], not the identity."""
    import torch

    from img_lightning.aligner import ImplicitAligner

    torch.manual_seed(0)
    aligner = ImplicitAligner(64, 64, 2, 4, 16)
    torch.nn.init.normal_(aligner.zero_linear.weight, std=0.05)  # not the identity: IMG must change the tokens
    # Our export format: the head split (4 x 16) is in its metadata, never guessed.
    return aligner.save_safetensors(tmp_path_factory.mktemp("aligner") / "aligner_tiny.safetensors")


@pytest.fixture(scope="session")
def tiny_eval_world(tiny_sdxl_dir, tiny_ip_adapter_dir, tiny_llava_dir, tiny_scorer_dirs, tiny_aligner):
    """The keyword arguments of ``img_lightning.tiny.demo_eval.tiny_eval_overrides`` for the tiny models."""
    return dict(sdxl_dir=tiny_sdxl_dir, ip_adapter_dir=tiny_ip_adapter_dir, llava_dir=tiny_llava_dir,
                aligner_path=tiny_aligner, scorer_dirs=tiny_scorer_dirs)


# -- files a test leaves for a person to look at (browser screenshots), listed at the end of the log --
_ARTIFACTS: list[str] = []


@pytest.fixture
def artifacts(tmp_path_factory, request):
    """The folder for this test's artifacts (``IMG_TEST_ARTIFACTS`` or pytest's temporary folder);
    every file left in it is listed in the log's summary."""
    from pathlib import Path

    root = Path(os.environ["IMG_TEST_ARTIFACTS"]) if os.environ.get("IMG_TEST_ARTIFACTS") else \
        tmp_path_factory.getbasetemp() / "artifacts"
    folder = root / request.node.name
    folder.mkdir(parents=True, exist_ok=True)
    yield folder
    _ARTIFACTS.extend(str(p) for p in sorted(folder.iterdir()))


def pytest_terminal_summary(terminalreporter):
    if _ARTIFACTS:
        terminalreporter.section("artifacts")
        for path in _ARTIFACTS:
            terminalreporter.write_line(path)
