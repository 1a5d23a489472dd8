"""How every command line of the project reports an expected failure.

    ap = ArgumentParser(...); add_debug_flag(ap); args = ap.parse_args(argv)
    return run_cli(lambda: work(args), debug=args.debug, usage=(ConfigError,))

A ``UserError`` (bad input, an unreadable file) becomes one line ``error: <message>`` on stderr
and exit status 1, or 2 for the ``usage`` types and for argparse's own errors; with ``--debug``
the traceback is printed instead. Anything else is a bug and keeps Python's traceback.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable

from pretrain.errors import UserError


class CommandError(UserError):
    """A failure a command line finds itself, with the exit status it should end with."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line as well (argparse puts the usage block first)."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def add_debug_flag(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--debug", action="store_true", help="on an error, print the full traceback")


def one_line(e: BaseException) -> str:
    # A message from a library may span lines; the contract is one line.
    return " ".join(str(e).split()) or type(e).__name__


def run_cli(fn: Callable[[], int | None], debug: bool = False, usage: tuple = (), also: tuple = (),
            raise_exit: bool = False):
    """``fn()``'s result, or the exit status of its expected failure (``UserError`` and the types
    in ``also``) after reporting it. ``raise_exit`` reports by ``SystemExit("error: ...")``, for
    tools whose callers already expect that."""
    try:
        return fn()
    except (UserError, *also) as e:
        if isinstance(e, CommandError):
            code = e.exit_code
        else:
            code = 2 if usage and isinstance(e, usage) else 1
        if debug:
            traceback.print_exc()
        elif raise_exit and code == 1:
            raise SystemExit(f"error: {one_line(e)}") from None
        else:
            print(f"error: {one_line(e)}", file=sys.stderr)
        if raise_exit:
            raise SystemExit(code) from None
        return code
