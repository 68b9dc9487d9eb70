"""Pieces every CLI shares: config arguments, ``--print-config``, logging, friendly errors."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable, Sequence

from ..hf_quiet import quiet_hf_progress
from ..config.loading import ConfigError, load_config, split_cli_args, to_yaml

CONFIG_EPILOG = (
    "Configs merge as: schema defaults <- each YAML file in order <- key=value overrides "
    "(dotted keys, e.g. data.batch_size=16). A misspelled key is an error."
)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="*", metavar="CONFIG.yaml|key=value",
                        help="YAML config files and key=value overrides, in merge order")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (every key, with defaults) and exit")


def resolve_config(schema: Any, args: argparse.Namespace) -> Any:
    files, overrides = split_cli_args(args.config)
    return load_config(schema, files, overrides, require_complete=not args.print_config)


OUR_LOGGERS = ("img_lightning", "preprocessing", "img-preprocess", "img-eval")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (so redirections and test capture work)."""

    _img_lightning = True

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


def setup_logging(verbose: bool = False) -> None:
    """Our loggers at INFO (DEBUG with -v) with a handler of their own; the root logger is left
    alone, so libraries that chat at INFO on it (open_clip) stay quiet and Lightning keeps its own
    handler (no doubled lines). Without -v, transformers/diffusers loading bars are hidden too."""
    level = logging.DEBUG if verbose else logging.INFO
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    for name in OUR_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
            logger.addHandler(handler)
    # An advertisement Lightning prints at every start.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage()
    )
    if not verbose:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        quiet_hf_progress()


def run_cli(body: Callable[[], int], known_errors: Sequence[type[BaseException]] = ()) -> int:
    """Run a CLI body; expected user errors become one line on stderr and exit code 2."""
    errors = (ConfigError, FileNotFoundError, FileExistsError, *known_errors)
    try:
        return body()
    except errors as err:  # type: ignore[misc]
        print(f"error: {err}", file=sys.stderr)
        return 2


def print_config(cfg: Any) -> int:
    print(to_yaml(cfg), end="")
    return 0
