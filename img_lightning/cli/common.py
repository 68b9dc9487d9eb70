"""What every CLI shares: one command-line shape, the same flags (``--version -v -q --no-progress
--debug``), config arguments, logging, and one error policy.

Shape (docs/configuration.md): ``COMMAND [STAGE] ARGS...``. ``STAGE`` is the sub-command of a
multi-stage CLI (``img-eval all``, ``img-preprocess verify``, ``img-finetune-mllm train``); ``ARGS``
are the config files then ``key=value`` overrides (or a stage's own positionals, e.g. a cache
directory), and options may stand anywhere after ``COMMAND``: before the stage, between configs
and overrides, at the end (:func:`parse_command`, :func:`parse_staged_command`).

Error policy (:func:`run_cli`): a :class:`~img_lightning.errors.UserError` (bad config, missing
file or model, mismatched cache or checkpoint, ...) prints one ``prog: error: ...`` line and exits
2; a full disk prints which file could not be written and exits 2; anything else is a bug of ours:
one line saying so and exit 1. ``--debug`` shows the full traceback instead.

This module imports nothing heavy, so ``--help`` and ``--version`` answer at once; commands import
torch, Lightning and the models inside their bodies.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Optional, TextIO, TypeVar

from ..config.loading import load_config, split_cli_args, to_yaml
from ..errors import UserError

T = TypeVar("T")

CONFIG_EPILOG = (
    "Configs merge as: schema defaults <- each YAML file in order <- key=value overrides "
    "(dotted keys, e.g. data.batch_size=16). A misspelled key is an error."
)
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("img-lightning")
    except PackageNotFoundError:  # running from a source tree that is not installed
        from ..version import __version__

        return __version__


# The common options that take no value: they may also stand before a multi-stage CLI's STAGE.
COMMON_SWITCHES = ("-v", "--verbose", "-q", "--quiet", "--no-progress", "--debug")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--version``, ``-v/--verbose``, ``-q/--quiet``, ``--no-progress``, ``--debug``: the same on every CLI."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-v", "--verbose", action="store_true", help="debug logging and library progress bars")
    noise.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars, logging unchanged (batch jobs' log files)")
    parser.add_argument("--debug", action="store_true", help="full tracebacks instead of one-line errors")


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars unless ``-q`` or ``--no-progress``."""
    return not (getattr(args, "quiet", False) or getattr(args, "no_progress", False))


def parse_command(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """``COMMAND ARGS...`` with options anywhere, also between config files and overrides
    (plain ``parse_args`` stops the ``nargs="*"`` list at the first option)."""
    return parser.parse_intermixed_args(None if argv is None else list(argv))


def parse_staged_command(parser: argparse.ArgumentParser, stages: Mapping[str, argparse.ArgumentParser],
                         argv: Optional[Sequence[str]], default: Optional[str] = None) -> argparse.Namespace:
    """``COMMAND [STAGE] ARGS...``: ``parser`` answers ``--help``/``--version`` and lists the stages;
    each stage's own parser reads the rest with options anywhere. Common switches written before
    the stage are kept (argparse's sub-parsers would reset them to their defaults). Without a
    stage name, ``default`` is assumed (``img-preprocess CONFIG`` = ``img-preprocess run CONFIG``).
    The result carries the stage as ``command``."""
    rest = list(sys.argv[1:] if argv is None else argv)
    lead = []
    while rest and rest[0] in COMMON_SWITCHES:
        lead.append(rest.pop(0))
    if not rest:
        parser.print_help()
        raise SystemExit(EXIT_USER_ERROR)
    if rest[0] in ("-h", "--help", "--version"):
        parser.parse_args(rest)  # prints the overview or the version and exits
    if rest[0] in stages:
        stage = rest.pop(0)
    elif default is not None:
        stage = default
    else:
        parser.error(f"unknown stage {rest[0]!r}: choose one of {', '.join(stages)}")
    args = stages[stage].parse_intermixed_args(lead + rest)
    args.command = stage
    return args


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="*", metavar="CONFIG.yaml|key=value",
                        help="YAML config files and key=value overrides, in merge order")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (every key, with defaults) and exit")


def resolve_config(schema: type[T], args: argparse.Namespace) -> T:
    files, overrides = split_cli_args(args.config)
    return load_config(schema, files, overrides, require_complete=not args.print_config)


OUR_LOGGERS = ("img_lightning", "preprocessing", "img-preprocess", "img-eval")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (so redirections and test capture work)."""

    _img_lightning = True

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:  # StreamHandler.__init__ assigns it
        pass


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Our loggers at INFO (DEBUG with -v, WARNING with -q) with a handler of their own, and not
    propagated to the root logger: a library that logs through ``logging.warning()`` (open_clip
    does) gives the root Python's default handler, which would print each of our lines twice. The
    root logger is otherwise left alone, so libraries that chat at INFO on it stay quiet and
    Lightning keeps its own handler. Without -v, transformers/diffusers loading bars are hidden too."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    for name in OUR_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.propagate = False
        if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
            logger.addHandler(handler)
    # An advertisement Lightning prints at every start.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage()
    )
    if not verbose:
        from ..hf_quiet import quiet_hf_progress

        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        quiet_hf_progress()


def setup_from_args(args: argparse.Namespace) -> None:
    setup_logging(verbose=getattr(args, "verbose", False) or getattr(args, "debug", False),
                  quiet=getattr(args, "quiet", False))


def run_cli(body: Callable[[], int], prog: str, debug: bool = False,
            known_errors: Sequence[type[BaseException]] = ()) -> int:
    """Run a CLI body under the error policy in the module docstring; returns the exit code."""
    handled: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, FileExistsError, *known_errors)
    try:
        return body()
    except handled as err:
        if debug:
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as err:
        if debug:
            raise
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" while writing {err.filename}" if err.filename else ""
            print(f"{prog}: error: the disk is full{where} ({err.strerror}). Free space or point the output "
                  f"elsewhere, then run the same command again: finished work is kept and skipped.", file=sys.stderr)
            return EXIT_USER_ERROR
        return _internal(prog, err)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if debug:
            raise
        return _internal(prog, err)


def _internal(prog: str, err: BaseException) -> int:
    print(f"{prog}: internal error: {type(err).__name__}: {err}\n"
          f"(this is a bug or an unexpected environment; rerun with --debug for the traceback and report it)",
          file=sys.stderr)
    return EXIT_INTERNAL_ERROR


def print_config(cfg: object) -> int:
    print(to_yaml(cfg), end="")
    return 0
