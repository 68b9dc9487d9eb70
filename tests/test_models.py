"""Locating models: never a hub round trip, one clear error for a missing model."""

from __future__ import annotations

import pytest

from img_lightning.models import ModelNotFoundError, from_pretrained, resolve_model_root


def test_from_pretrained_never_asks_the_hub(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # even when online mode is on
    seen = {}

    def loader(name, **kwargs):
        seen.update(kwargs, name=name)
        raise OSError("not in the local cache")

    with pytest.raises(ModelNotFoundError, match=r"'org/missing'.*my\.key"):
        from_pretrained(loader, "model", "org/missing", None, "my.key", dtype="x")
    assert seen == {"name": "org/missing", "local_files_only": True, "dtype": "x"}


def test_missing_local_path_and_unknown_id_name_the_key(tmp_path):
    with pytest.raises(ModelNotFoundError, match="encoders.mllm.path"):
        resolve_model_root("org/model", str(tmp_path / "absent"), None, "encoders.mllm.path")
    with pytest.raises(ModelNotFoundError, match=r"'org/not-downloaded'.*hf download"):
        resolve_model_root("org/not-downloaded", None, None, "encoders.mllm.path")


# ---------------------------------------------------------------- the advice for a missing model
def _commands(text: str) -> list[str]:
    """The commands quoted (in backticks) in an error message."""
    import re

    return re.findall(r"`([^`]+)`", text)


def _hf_usage_error(command: str) -> str | None:
    """What the installed `hf` command line says about ``command`` before doing anything: a usage
    error (unknown option, missing argument, extra argument), or None when it parses. It then runs
    as a dry run, which fails offline: the test environment has no hub (HF_HUB_OFFLINE=1)."""
    import shlex

    import click
    from huggingface_hub.cli.hf import app

    argv = shlex.split(command)
    assert argv[:2] == ["hf", "download"], command
    try:
        app.main(args=[*argv[1:], "--dry-run"], prog_name="hf", standalone_mode=False)
    except click.UsageError as err:
        return err.format_message()
    except Exception:  # noqa: BLE001 - offline: the parsed command could not reach the hub
        return None
    return None


def _check_commands(text: str, key_values: dict[str, str]) -> None:
    from img_lightning.cli.convert_llava import build_parser

    commands = _commands(text)
    assert commands, text
    for command in commands:
        if command.startswith("img-convert-llava"):
            import shlex

            args = build_parser().parse_args(shlex.split(command)[1:])
            assert args.src and args.dst
        else:
            assert _hf_usage_error(command) is None, command


def test_the_released_mllm_advice_is_commands_that_work(tmp_path, monkeypatch):
    """shi-labs/IMG/llava is a folder of the repository shi-labs/IMG, in the original LLaVA format."""
    from img_lightning.config.loading import ConfigError, load_config
    from img_lightning.config.preprocess import PreprocessConfig
    from img_lightning.models import check_model

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError) as err:
        check_model("MLLM", "shi-labs/IMG/llava", None, "encoders.mllm.path")
    text = str(err.value)
    assert "hf download shi-labs/IMG/llava" not in text and "hf download shi-labs/IMG --include 'llava/*'" in text
    assert "img-convert-llava /models/IMG/llava /models/IMG/llava-hf" in text
    assert text.rstrip(".").endswith("set encoders.mllm.path=/models/IMG/llava-hf")
    _check_commands(text, {})
    # the recipe leaves the path ???: the error says where it comes from
    with pytest.raises(ConfigError) as err:
        load_config(PreprocessConfig, ["configs/preprocess/sdxl_llava13b.yaml"], ["data.input=x", "data.output=y",
                                                                                  "encoders.mllm.questions=q.json"])
    assert "encoders.mllm.path: the released IMG MLLM is the llava/ folder of shi-labs/IMG" in str(err.value)


def test_every_shipped_configs_missing_model_advice_parses(tmp_path, monkeypatch):
    """With an empty Hugging Face cache, every model of every shipped evaluation config is missing;
    each error's commands are accepted by the installed `hf` (and `img-convert-llava`)."""
    from img_lightning.config.eval_loading import load_eval_config
    from img_lightning.config.loading import shipped_configs
    from img_lightning.evaluation.preflight import PreflightError, preflight

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    root = shipped_configs() / "eval"
    seen = set()
    for backbone in sorted((root / "backbones").glob("*.yaml")):
        for bench in sorted((root / "benchmarks").glob("*.yaml")):
            cfg = load_eval_config([str(backbone), str(bench), "run_dir=x", "prompts.path=x"], allow_missing=True)
            with pytest.raises(PreflightError) as err:
                preflight(cfg, "all")
            seen |= set(_commands(str(err.value)))
    assert any("--include 'llava/*'" in c for c in seen)  # the recipes' released MLLM
    assert any(c.startswith("hf download h94/IP-Adapter") for c in seen)
    assert any(c.startswith("hf download xswu/HPSv2 HPS_v2.1_compressed.pt") for c in seen)
    assert "No such option" in _hf_usage_error("hf download shi-labs/IMG --inclde 'llava/*'")  # the check can fail
    for command in sorted(seen):
        if command.startswith("img-convert-llava"):
            continue
        assert command.startswith("hf download"), command
        assert _hf_usage_error(command) is None, command
