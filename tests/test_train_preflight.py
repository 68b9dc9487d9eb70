"""img-train checks its cache before it builds models, launches processes or creates a run directory."""

from __future__ import annotations

import pytest

from img_lightning.cache.synthetic import write_synthetic_cache
from img_lightning.cli.train import main as train_main
from train_utils import tiny_overrides


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    m = write_synthetic_cache(root / "c", 6, guidance_dim=16, ip_tokens=4, ip_dim=8, min_tokens=3, max_tokens=9)
    return root / "c", m.cache_key


@pytest.mark.parametrize("problem,expected", [
    ({"data.cache": "/nonexistent/cache"}, "manifest.json not found"),
    ({"data.cache_key": "0123456789abcdef"}, "does not match the key"),
    ({"model.guidance_dim": 32}, "model.guidance_dim=32"),
    ({"data.batch_size": 7}, "cannot fill one batch"),
])
def test_bad_cache_fails_before_anything_is_created(cache, tmp_path, capsys, problem, expected):
    path, key = cache
    argv = tiny_overrides(path, key, tmp_path / "runs", "r", **problem)
    assert train_main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # the CLI's own last word
    assert last.startswith("img-train: error:") and expected in last
    assert not (tmp_path / "runs").exists()
