"""User errors and how every command reports them: one line on stderr, exit code 2.

A bug still gets its traceback; what a user can fix (a flag, missing data, a broken
checkpoint) is a `ConfigError` or a `CheckpointError` and is reported by `fail`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A user error in the run's configuration or data: reported as one line, exit code 2."""


class DataError(ConfigError):
    """Missing or unreadable data: a user error, reported in one line."""

    def __init__(self, message: str) -> None:
        # Raised in a DataLoader worker, it comes back as DataError("Caught DataError in DataLoader
        # worker process 0.\nOriginal Traceback ...\ntrainer.data.DataError: <message>"): keep the message.
        if message.startswith("Caught DataError"):
            message = message.strip().splitlines()[-1].split("DataError: ", 1)[-1]
        super().__init__(message)


class CheckpointError(Exception):
    """A checkpoint that cannot be used or written: reported as one line, exit code 2."""


def first_line(exc: BaseException) -> str:
    """An exception's first line, for one-line user errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def fail(message: str, code: int = 2, everywhere: bool = True) -> int:
    """One line on stderr and an exit code. With several processes, each process that failed says
    so, prefixed with its rank (the failure may be its machine's alone); `everywhere=False` keeps
    the other ranks quiet, for errors every process sees alike."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 or everywhere:
        prefix = f"[rank {rank}] " if rank else ""
        print(f"trainer: error: {prefix}{one_line(message)}", file=sys.stderr, flush=True)
    return code


def one_line(text: str) -> str:
    """`text` on one line: newlines and other control characters (in a path, say) escaped as Python writes them."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class Parser(argparse.ArgumentParser):
    """Every command's parser: a bad flag or value is one line and exit code 2, like every other user error.
    A flag is taken only as spelled in full (`--epoch` is no `--epochs`: a new flag never changes what an old
    abbreviation meant)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Shows a default once, and only where there is one (a help text that names it is left alone)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        hidden = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if "default" in text or hidden or not action.option_strings:  # 0 and 0.0 are shown
            return text
        return f"{text} (default: %(default)s)"


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """`--json [PATH]`, the same in every command: no PATH or `-` means stdout (instead of the table)."""
    parser.add_argument(
        "--json", nargs="?", const="-", default=None, metavar="PATH",
        help="also write the results as JSON to PATH; with no PATH (or -), print JSON to stdout instead of the table",
    )  # fmt: skip


def write_json(obj: Any, target: str) -> int:
    """Writes `obj` as JSON to `target` (`-`: stdout); a failure is one line and exit code 2."""
    text = json.dumps(obj, indent=1) + "\n"
    if target == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return 0
    try:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(text)
    except OSError as exc:
        return fail(f"cannot write --json {target}: {exc.strerror or exc}")
    return 0
