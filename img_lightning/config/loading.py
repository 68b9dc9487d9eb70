"""Typed OmegaConf loading shared by every CLI: ``schema defaults <- YAML files <- CLI dotlist``.

The schema is a dataclass, so a misspelled key fails at load time with its dotted name instead of
being silently ignored (the failure mode of plain dict configs), and the error suggests the nearest
valid key (:func:`suggest_key`).

:func:`load_config` returns a structured ``DictConfig`` typed as its schema (``load_config(TrainConfig,
...)`` is a ``TrainConfig`` to the type checker; OmegaConf still checks every assignment against the
schema at run time). The helpers that work on a config of any schema take ``object``
(:mod:`.node`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, TypeVar, cast

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from ..errors import UserError
from .node import as_node

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config that cannot be used; the message names the file or key and what to do."""


def shipped_configs() -> Path:
    """The shipped ``configs/`` directory: package data of ``img_lightning`` (in a source checkout a
    link to the top-level ``configs/``, in an installed wheel a copy of it)."""
    from importlib.resources import files

    return Path(str(files("img_lightning").joinpath("configs")))


def resolve_config_path(path: str | Path) -> Path:
    """A config path as given (absolute, or relative to the working directory), else one of the
    shipped configs named as ``configs/train/demo.yaml`` (or ``train/demo.yaml``), so they can be
    named from any directory, from a checkout or after a plain ``pip install``."""
    given = Path(path)
    if given.is_file() or given.is_absolute():
        return given
    parts = given.parts[1:] if given.parts[:1] == ("configs",) else given.parts
    shipped = shipped_configs().joinpath(*parts)
    return shipped if shipped.is_file() else given


def _written_missing(cfg: DictConfig, key: str) -> bool:
    """Whether ``key`` (as :func:`OmegaConf.missing_keys` names it) is ``???`` itself, rather than an
    interpolation (``${prompts.path}``) of a key that is."""
    parent, _, leaf = _dotted(key).rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return OmegaConf.is_missing(node, int(leaf) if leaf.isdigit() else leaf)


def _merge(base: DictConfig, other: DictConfig, source: str) -> DictConfig:
    try:
        merged = OmegaConf.merge(base, other)
        # OmegaConf keeps the base's value where `other` says ???; a file that writes ??? for a
        # key means "the user must set this", so that key becomes missing again. Inside a list too
        # (`scorers: [{checkpoint: ???}]`): a merge replaces a list whole, so `other`'s indices are
        # the merged list's.
        for key in OmegaConf.missing_keys(other):
            if _written_missing(other, key):  # not an interpolation of a missing key: that stays
                OmegaConf.update(merged, key, "???", merge=False)
        assert isinstance(merged, DictConfig)  # two mapping configs merge into one
        return merged
    except ConfigKeyError as err:
        key = getattr(err, "full_key", None) or getattr(err, "key", None) or str(err)
        near = suggest_key(base, _dotted(str(key)), getattr(err, "object_type", None))
        hint = f"did you mean '{near}'?" if near else "check its spelling;"
        raise ConfigError(
            f"{source}: unknown config key '{key}': {hint} "
            f"`--print-config` shows every valid key with its default."
        ) from None
    except ValidationError as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"{source}: bad value for '{key}': {err.msg}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: {err}") from None


def _is_indexed(override: str) -> bool:
    """``scorers.0.path=...``: a key that indexes into a list."""
    return any(part.isdigit() for part in override.split("=", 1)[0].split("."))


def _dotted(key: str) -> str:
    return re.sub(r"\[(\d+)\]", r".\1", key)


def dotted_keys(cfg: object) -> list[str]:
    """Every key of ``cfg`` as it is written on the command line, sections included
    (``data``, ``data.batch_size``, ``scorers.0.checkpoint``)."""
    def walk(node: Any, prefix: str) -> Iterator[str]:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for name, value in items:
            key = f"{prefix}{name}"
            yield key
            yield from walk(value, key + ".")

    return list(walk(OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False), ""))


def suggest_key(cfg: object, key: str, section: Optional[type] = None) -> Optional[str]:
    """The valid key nearest to a misspelled one: a close name in the same section (``data.batchsize``
    -> ``data.batch_size``; ``section``, the schema dataclass the key was refused by, gives the names
    where ``cfg`` has no instance of it yet, e.g. a list entry), else the one key of that exact name
    in another section (``optim.batch_size`` -> ``data.batch_size``), else the closest dotted key
    overall; None when nothing is close."""
    keys = dotted_keys(cfg)
    parent, _, leaf = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == parent}
    if isinstance(section, type) and dataclasses.is_dataclass(section):
        siblings.update({f.name: f"{parent}.{f.name}" if parent else f.name for f in dataclasses.fields(section)})
    close = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
    if close:
        return siblings[close[0]]
    same_name = [k for k in keys if k.rpartition(".")[2] == leaf]
    if len(same_name) == 1:
        return same_name[0]
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    return close[0] if close else None


def load_config(
    schema: type[T],
    files: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    *,
    require_complete: bool = True,
) -> T:
    """Build a typed config: schema defaults, then each YAML file, then ``key=value`` overrides.

    Returns a structured ``DictConfig`` (attribute access, type checked on assignment), typed as the
    schema.
    """
    cfg: DictConfig = OmegaConf.structured(schema)
    for path in files:
        path = resolve_config_path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as err:  # yaml errors carry line numbers in their text
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        cfg = _merge(cfg, as_node(loaded), str(path))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got: {bad}")
        # OmegaConf's dotlist merge cannot index into lists (scorers.0.path=...): those go afterwards.
        indexed = [o for o in overrides if _is_indexed(o)]
        try:
            dotlist = OmegaConf.from_dotlist([o for o in overrides if o not in indexed])
        except OmegaConfBaseException as err:
            raise ConfigError(f"command-line override: {err}") from None
        cfg = _merge(cfg, dotlist, "command line")
        for o in indexed:
            key, value = o.split("=", 1)
            try:
                OmegaConf.update(cfg, key, yaml.safe_load(value) if value else None, merge=True)
            except Exception as err:
                raise ConfigError(f"command-line override '{o}': {err}") from None
    if require_complete:
        missing = missing_keys(cfg)
        if missing:
            raise ConfigError(missing_message(cfg, missing))
    validate(cfg, schema)
    return cast(T, cfg)


def where_to_get(cfg: object, key: str) -> str:
    """For a ``*.path`` key left ``???`` beside a ``model`` id: how to fetch the model ("" otherwise)."""
    if not key.endswith(".path"):
        return ""
    model = OmegaConf.select(as_node(cfg), key[: -len("path")] + "model", default=None)
    if not isinstance(model, str) or not model:
        return ""
    from ..model_sources import fetch_advice

    return fetch_advice(model, key)


def missing_message(cfg: object, missing: Sequence[str]) -> str:
    """The error for keys still ``???``: their names, and for a model's path where to get the model."""
    hints = [f"\n  {key}: {hint}" for key in missing if (hint := where_to_get(cfg, key))]
    return ("these config keys have no value (set them in a YAML file or as key=value): " + ", ".join(missing)
            + "".join(hints))


def validate(cfg: object, schema: type) -> None:
    """Run the schema's value checks (``CHECKS``, see :mod:`.checks`); every problem in one error."""
    from .checks import problems

    found = problems(cfg, getattr(schema, "CHECKS", {}))
    if found:
        raise ConfigError("invalid config values:\n  " + "\n  ".join(found))


def missing_keys(cfg: object) -> list[str]:
    """Keys still ``???``, sorted, written as they are set on the command line (``scorers.0.checkpoint``)."""
    return sorted(_dotted(k) for k in OmegaConf.missing_keys(cfg))


def to_yaml(cfg: object) -> str:
    """The resolved config as YAML (what is saved into run directories)."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_container(cfg: object) -> dict:
    """A plain, resolved dict of plain values (for hashing, JSON, and checkpoints that must load
    with ``weights_only=True``: enums become their names). A plain mapping is copied as is."""
    if not OmegaConf.is_config(cfg):
        return dict(cast(Mapping[str, Any], cfg))
    out = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert isinstance(out, dict), f"to_container takes a mapping config, not a {type(out).__name__}"
    return out


def split_cli_args(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split positional CLI arguments into YAML files and ``key=value`` overrides."""
    files = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    return files, overrides
