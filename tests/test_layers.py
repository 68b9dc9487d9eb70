"""The layout follows the data flow: every module imports only from its own layer or the ones below.

    foundation -> cache -> data -> features -> training -> eval_run -> generation -> evaluation -> cli -> api -> apps

The root package's ``__init__`` (``api``) is the public Python API: it re-exports, on first use,
classes of the layers below (``IMGRefiner``); nothing inside the library imports it.

``LAYERS`` places every module of ``img_lightning`` and ``preprocessing`` (a package entry covers its
sub-modules; a longer entry overrides it for one module). The test parses every file's imports,
including the ones inside functions (commands import heavy modules lazily) and under
``TYPE_CHECKING``, and fails on any import of a higher layer, naming the file, the line and both
layers; a module that no entry places fails too, so a new package must be given its layer here.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("img_lightning", "preprocessing")

# Lowest first. Entries are modules or packages (a package covers everything below it).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # errors, atomic writes, file hashes, typed config schemas and loading, model lookup, run directories
    # (and their lock), checkpoint integrity, the version, where models come from,
    # the fingerprint that proves an export holds the trained weights, SLURM's early time-limit warning
    ("foundation", ("img_lightning.errors", "img_lightning.atomic", "img_lightning.config",
                    "img_lightning.models", "img_lightning.hf_quiet", "img_lightning.log_steps",
                    "img_lightning.run_dir", "img_lightning.parquet_files", "img_lightning.hashing",
                    "img_lightning.run_lock", "img_lightning.checkpoint_files",
                    "img_lightning.version", "img_lightning.model_sources",
                    "img_lightning.weights_guard", "img_lightning.time_limit_signal")),
    ("cache", ("img_lightning.cache",)),  # the feature-cache format, writer, manifest, reader
    ("data", ("img_lightning.data",)),  # the DataModule over a cache
    # MLLM and IP encoders (with what they read of a finetuned-MLLM export), the cache recipe (its key
    # needs the question file's hash), checkpoint conversion
    ("features", ("img_lightning.encoders", "img_lightning.recipe", "img_lightning.convert")),
    # the aligner, its objective and LightningModule, the one job assembly and its two stages (the
    # aligner's training job, the MLLM finetuning stage)
    ("training", ("img_lightning.aligner", "img_lightning.objective", "img_lightning.module",
                  "img_lightning.callbacks", "img_lightning.checkpoint_io", "img_lightning.job",
                  "img_lightning.training", "img_lightning.finetune")),
    # prompt records, image store, arms: what generation and evaluation share
    ("eval_run", ("img_lightning.eval_run",)),
    ("generation", ("img_lightning.generation",)),
    ("evaluation", ("img_lightning.evaluation",)),
    ("cli", ("img_lightning.cli", "img_lightning.submit")),  # the commands; img-submit drives the sbatch scripts
    ("api", ("img_lightning",)),  # the root package's __init__: the public API (lazy re-exports)
    # applications on top of the library: tiny demo/test models and the demo, preprocessing (img-preprocess, img-demo)
    ("apps", ("img_lightning.tiny", "preprocessing")),
)
PLACES = {name: i for i, (_, names) in enumerate(LAYERS) for name in names}
LAYER_NAMES = [name for name, _ in LAYERS]
EXACT = {"img_lightning"}  # the root package entry places its __init__ only, not every sub-module


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> Optional[int]:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in PLACES and (n == len(parts) or name not in EXACT):
            return PLACES[name]
    return None


def source_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path, source: Optional[str] = None) -> Iterator[tuple[int, str]]:
    """``(line, imported module)`` for every import in ``path`` (or ``source`` as if it were that
    file), relative ones resolved."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    text = path.read_text(encoding="utf-8") if source is None else source
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{alias.name}"
                yield node.lineno, sub if _is_module(sub) else target


def project_imports(path: Path, source: Optional[str] = None) -> Iterator[tuple[int, str]]:
    for line, target in imports_of(path, source):
        if target.split(".")[0] in PACKAGES:
            yield line, target


def test_every_module_has_a_layer():
    unplaced = [module_name(p) for p in source_files() if layer_of(module_name(p)) is None]
    assert not unplaced, f"give these modules a layer in tests/test_layers.py LAYERS: {unplaced}"


def test_no_upward_imports():
    upward = []
    for path in source_files():
        mine = layer_of(module_name(path))
        for line, target in project_imports(path):
            theirs = layer_of(target)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{path.relative_to(ROOT)}:{line} ({LAYER_NAMES[mine]}) imports {target} "
                              f"({LAYER_NAMES[theirs]})")
    assert not upward, "imports of a higher layer:\n  " + "\n  ".join(upward)


@pytest.mark.parametrize("source, expected", [
    ("from ..generation.store import ImageStore\n", "img_lightning.evaluation.generation.store"),
    ("from ...generation.pipeline import DiffusionBackend\n", "img_lightning.generation.pipeline"),
    ("def f():\n    from ...cli import eval\n", "img_lightning.cli.eval"),
    ("import img_lightning.cli.eval as e\n", "img_lightning.cli.eval"),
    ("from . import clip\n", "img_lightning.evaluation.scorers.clip"),
])
def test_the_scan_resolves_every_import_form(source, expected):
    """The checker itself, on a module two packages deep: relative (also inside a function), absolute,
    and ``from package import submodule``."""
    probe = ROOT / "img_lightning" / "evaluation" / "scorers" / "probe.py"
    assert [t for _, t in project_imports(probe, source)] == [expected]


def test_layer_placement():
    assert layer_of("img_lightning.errors") == layer_of("img_lightning.version") == 0
    assert layer_of("img_lightning") == LAYER_NAMES.index("api") > layer_of("img_lightning.cli.eval")
    assert layer_of("img_lightning.encoders.export_manifest") < layer_of("img_lightning.finetune.export")
    assert layer_of("img_lightning.evaluation.scorers.clip") == LAYER_NAMES.index("evaluation")
    assert layer_of("img_lightning.cli.eval") > layer_of("img_lightning.evaluation.pipeline")
    assert layer_of("img_lightning.no_such_module") is None  # the root entry does not place new modules


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (lazy imports included; a package import counts as
    an import of its ``__init__``)."""
    modules = {module_name(p) for p in source_files()}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for path in source_files():
        mine = module_name(path)
        for _, target in project_imports(path):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != mine:
                graph[mine].add(target)
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return circles


def test_no_import_circles():
    """Modules that import each other (directly or round a longer loop) cannot be read, tested or
    moved one at a time; a lazy import inside a function only hides the circle from Python."""
    circles = import_circles(import_graph())
    assert not circles, "modules importing each other:\n  " + "\n  ".join(" <-> ".join(c) for c in circles)


def test_the_circle_check_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_circles(graph) == [["a", "b", "c"]]
    assert import_circles({"a": {"b"}, "b": set()}) == []
