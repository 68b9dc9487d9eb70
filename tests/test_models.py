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
