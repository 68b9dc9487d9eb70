"""`img-demo` end to end at a small size: its own check is a tolerance, and its summary shows an
`img-generate` command that works as printed."""

from __future__ import annotations

import shlex

import pytest

from img_lightning.cli.generate import main as generate_main
from preprocessing.demo import MIN_IMPROVEMENT
from preprocessing.demo import main as demo_main


@pytest.mark.slow
def test_a_short_demo_fails_its_tolerance_and_shows_img_generate(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "-q", "--pairs", "48", "--val-pairs", "16", "--steps", "30", "--triplets", "24",
            "--mllm-steps", "4", "--eval-prompts", "2"]
    assert demo_main(argv) == 1  # 30 steps: ~19% below identity, short of the tolerance
    out, err = capsys.readouterr()
    assert f"the demo expects at least {100 * MIN_IMPROVEMENT:.0f}%" in err and "% below the identity baseline" in err
    line = next(line for line in out.splitlines() if "your own prompt" in line)
    command = shlex.split(line.split(": ", 1)[1])
    assert command[0] == "img-generate" and command[1] == str(tmp_path / "eval" / "config.yaml")
    before = set((tmp_path / "generate").glob("*_strip.png"))
    assert generate_main([*command[1:], "-q"]) == 0  # the printed command, as a user would paste it
    assert len(set((tmp_path / "generate").glob("*_strip.png")) - before) == 1
    assert "IMGRefiner.from_config(" in out
