"""img-train checks its cache before it builds models, launches processes or creates a run directory."""

from __future__ import annotations

import pytest

from img_lightning.cache.synthetic import write_synthetic_cache
from img_lightning.cli.train import main as train_main
from train_utils import TINY_CACHE_DIMS, tiny_overrides


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


@pytest.mark.parametrize("other", [{"guidance_dim": 24}, {"dtype": "bfloat16"}])
def test_a_shard_of_another_width_or_dtype_is_one_clear_error(tmp_path, capsys, other):
    """A mis-copied shard (another recipe's) never reaches the model: skipped (size differs) or its
    samples dropped (same size, other dtype), then the run stops naming the cache."""
    import shutil

    dims = TINY_CACHE_DIMS
    a = write_synthetic_cache(tmp_path / "a", 24, **dims)
    write_synthetic_cache(tmp_path / "b", 24, **{**dims, **other})
    for name in ("shard-000001.tar", "shard-000001.index.json"):
        shutil.copy(tmp_path / "b" / name, tmp_path / "a" / name)
    argv = tiny_overrides(tmp_path / "a", a.cache_key, tmp_path / "runs", "r", **{"trainer.max_steps": 12})
    assert train_main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("img-train: error:") and "img-preprocess verify" in last
