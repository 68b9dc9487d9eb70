"""A plain (non-editable) wheel install works: it ships every config and the CLIs find them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, capture_output=True, cwd=out)
    (found,) = out.glob("img_lightning-*.whl")
    return found


@pytest.mark.slow
def test_wheel_holds_every_shipped_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = sorted(p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*") if p.is_file())
    assert shipped, "no configs found in the checkout"
    missing = [f for f in shipped if f"img_lightning/configs/{f}" not in names]
    assert not missing, f"configs missing from the wheel: {missing}"
    # Other non-Python files the package reads at run time (report templates, ...).
    data = [p.relative_to(REPO).as_posix() for p in (REPO / "img_lightning").rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "configs" not in p.parts]
    assert data and not [f for f in data if f not in names], data


@pytest.mark.slow
def test_installed_wheel_resolves_the_demo_configs(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    probe = (
        "import img_lightning, preprocessing.demo as demo\n"
        "from img_lightning.config.loading import load_config\n"
        "from img_lightning.config.train import TrainConfig\n"
        "from img_lightning.config.preprocess import PreprocessConfig\n"
        "from img_lightning.training import expected_cache_key\n"
        "cfg = load_config(TrainConfig, ['configs/train/demo.yaml'], require_complete=False)\n"
        "print(img_lightning.__file__); print(demo.TRAIN_CONFIG); print(demo.PREPROCESS_CONFIG)\n"
        "print(expected_cache_key(cfg.data))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    package, train_cfg, pre_cfg, key = out.stdout.split()
    for path in (package, train_cfg, pre_cfg):
        assert Path(path).is_relative_to(site), path  # the installed copy, not the checkout
        assert Path(path).exists()
    assert len(key) == 16


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _dist_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_every_dependency_is_listed_once():
    project = _project()
    for group, reqs in {"dependencies": project["dependencies"], **project["optional-dependencies"]}.items():
        names = [_dist_name(r) for r in reqs]
        twice = sorted({n for n in names if names.count(n) > 1})
        assert len(names) == len(set(names)), f"{group}: listed twice: {twice}"


def test_python_claim_matches_the_classifiers():
    """requires-python claims no version below the lowest one with a classifier (the ones CI tests)."""
    project = _project()
    tested = sorted(tuple(map(int, c.rsplit(" :: ", 1)[1].split("."))) for c in project["classifiers"]
                    if c.startswith("Programming Language :: Python :: 3."))
    assert tested, "no Programming Language :: Python :: 3.X classifier"
    assert project["requires-python"] == ">=" + ".".join(map(str, tested[0]))
