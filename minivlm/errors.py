"""Errors a user can fix, and the one place that turns them into a line on stderr.

Library code raises ValueError (or CheckpointError, a ValueError about one checkpoint file) whose
message names the file, record or flag and what was expected; it never prints or exits. Every
entry point ends with `run_cli(main)`, so `python train_sft.py ...` with a truncated checkpoint
prints one line, as argparse does for a bad flag:

    train_sft.py: error: runs/pretrain/step_000200/model.safetensors: cannot read ... (exit code 2)

while `main(argv)` called from Python (demo.py, the tests) raises normally. Anything else is a
bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

EXIT_ERROR = 2  # argparse's exit code for a bad command line; ours for bad input of any kind
EXIT_INTERRUPTED = 130  # the shell's code for a process stopped by Ctrl-C (128 + SIGINT)


class CheckpointError(ValueError):
    """A checkpoint file that is there but cannot be used: truncated, corrupt, or not matching
    the rest of its checkpoint. The message starts with the file's path."""


def one_line(error: BaseException) -> str:
    """The error's message on one line; an OSError as 'path: reason' (no '[Errno 2]')."""
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename is not None else ""
        return f"{where}{error.strerror}"
    return " ".join(str(error).split()) or type(error).__name__


def run_cli(main: Callable, argv: list[str] | None = None, prog: str | None = None):
    """Call `main(argv)`; an expected error becomes one line `PROG: error: ...` on stderr and exit
    code 2, Ctrl-C a short line and 130. Returns what `main` returns."""
    prog = prog or Path(sys.argv[0]).name  # what argparse names the program in its own errors
    try:
        return main(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except (ValueError, OSError) as error:  # bad data, flags, checkpoints, files: not bugs
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(EXIT_ERROR) from None
