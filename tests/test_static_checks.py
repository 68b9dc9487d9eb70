"""ruff (lint, import order) and mypy (types) run as part of the README's test command.

The rules live in ``pyproject.toml`` (``[tool.ruff]``, ``[tool.mypy]``); both tools come with the
``dev`` extra. A finding fails the test with the tool's own output (file, line, rule), so the fix is
where it points. ``ruff check --fix`` repairs import order and most style findings by itself.
ruff checks the whole repository and mypy every module of ``img_lightning/`` and ``preprocessing/``:
nothing is skipped.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Type checked: every module of the two packages. The core packages (cache, data, objective, aligner,
# module, callbacks, config, encoders, generation) declare every function's types
# (disallow_untyped_defs in pyproject.toml).
PACKAGES = ("img_lightning", "preprocessing")
CORE = (
    "img_lightning/cache", "img_lightning/data", "img_lightning/objective.py", "img_lightning/aligner.py",
    "img_lightning/module.py", "img_lightning/callbacks", "img_lightning/config", "img_lightning/encoders",
    "img_lightning/generation",
)


def mypy_files() -> list[str]:
    files = (p.relative_to(ROOT).as_posix() for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")))
    return [f for f in files if "__pycache__" not in f]


def _tool(name: str) -> None:
    if importlib.util.find_spec(name) is None:
        pytest.fail(f"{name} is not installed: `pip install -e '.[dev]'` installs the static checkers")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_listed_paths_exist():
    missing = [p for p in CORE if not (ROOT / p).exists()]
    assert not missing, f"tests/test_static_checks.py lists paths that do not exist: {missing}"


def test_ruff_is_clean():
    _tool("ruff")
    result = _run("ruff", "check", "--no-cache", "--output-format", "concise", ".")
    assert result.returncode == 0, f"ruff check found problems:\n{result.stdout}{result.stderr}"


def test_core_packages_annotate_every_function():
    """pyproject.toml's ``disallow_untyped_defs`` override names every core package or module."""
    import tomllib

    overrides = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["overrides"]
    strict = {m for o in overrides if o.get("disallow_untyped_defs") for m in o["module"]}
    for core in CORE:
        name = core.removesuffix(".py").replace("/", ".")
        assert (name + ".*" if not core.endswith(".py") else name) in strict, core


def test_mypy_is_clean():
    _tool("mypy")
    result = _run("mypy", "--no-error-summary", "--no-pretty", *mypy_files())
    assert result.returncode == 0, f"mypy found problems:\n{result.stdout}{result.stderr}"
