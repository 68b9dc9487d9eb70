"""Every CLI: --version, the same verbosity flags, one error policy, and --help without torch."""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest

from img_lightning.cli.common import run_cli, version
from img_lightning.cli.convert_llava import main as convert_llava_main
from img_lightning.cli.eval import main as eval_main
from img_lightning.cli.finetune_mllm import main as finetune_mllm_main
from img_lightning.cli.generate import main as generate_main
from img_lightning.cli.train import main as train_main
from img_lightning.config.loading import ConfigError
from preprocessing.cli import main as preprocess_main
from preprocessing.demo import main as demo_main

CLIS = {"img-train": train_main, "img-eval": eval_main, "img-preprocess": preprocess_main, "img-demo": demo_main,
        "img-convert-llava": convert_llava_main, "img-finetune-mllm": finetune_mllm_main, "img-generate": generate_main}
CLI_MODULES = ("img_lightning.cli.train", "img_lightning.cli.eval", "preprocessing.cli", "preprocessing.demo",
               "img_lightning.cli.convert_llava", "img_lightning.cli.finetune_mllm", "img_lightning.cli.generate")


@pytest.mark.parametrize("prog", sorted(CLIS))
def test_version_and_common_flags(prog, capsys):
    with pytest.raises(SystemExit) as exc:
        CLIS[prog](["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"{prog} {version()}"
    with pytest.raises(SystemExit):
        CLIS[prog](["--help"])
    help_text = capsys.readouterr().out
    for flag in ("--version", "--verbose", "--quiet", "--no-progress", "--debug"):
        assert flag in help_text, (prog, flag)


def test_help_does_not_import_torch():
    """--help must answer at once: the CLI modules import no heavy library at import time."""
    code = ("import sys; import " + ", ".join(CLI_MODULES) +
            "; heavy = [m for m in ('torch', 'lightning', 'transformers', 'diffusers') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _raise(err: BaseException):
    def body() -> int:
        raise err

    return body


def test_error_policy(capsys):
    assert run_cli(_raise(ConfigError("optim.lr=-1: must be > 0")), "img-x") == 2
    assert capsys.readouterr().err.strip() == "img-x: error: optim.lr=-1: must be > 0"
    full = OSError(errno.ENOSPC, "No space left on device")
    full.filename = "/cache/shard-000001.tar"
    assert run_cli(_raise(full), "img-x") == 2
    err = capsys.readouterr().err
    assert "disk is full while writing /cache/shard-000001.tar" in err and "Traceback" not in err
    assert run_cli(_raise(RuntimeError("boom")), "img-x") == 1
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: boom" in err and "--debug" in err
    with pytest.raises(RuntimeError, match="boom"):
        run_cli(_raise(RuntimeError("boom")), "img-x", debug=True)
    with pytest.raises(ConfigError):
        run_cli(_raise(ConfigError("x")), "img-x", debug=True)


def test_config_values_are_checked_at_load(capsys):
    argv = ["data.cache=/x", "data.cache_key=k", "optim.lr=-1", "data.batch_size=0", "optim.betas=[0.9,1.5]",
            "data.max_bad_fraction=2", "trainer.precision=bf16"]
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    for key in ("optim.lr=-1.0", "data.batch_size=0", "optim.betas", "data.max_bad_fraction=2.0", "trainer.precision"):
        assert key in err, key
    assert "Traceback" not in err
