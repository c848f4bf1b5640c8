"""What the qvm tools share: argument parsing in qubesadmin's manner, and the error convention."""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from qubesim import dom0, release
from qubesim.errors import QubesimError, UsageError
from qubesim.layout import Layout, current
from qubesim.model import Database, State
from qubesim.runtime import Runtime


class Context:
    """The simulated host as a tool sees it."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.database = Database(layout)
        self.runtime = Runtime(layout)

    def state(self) -> State:
        return self.database.read(self.runtime.is_running)

    def release(self) -> str:
        return self.state().release

    def transaction(self) -> AbstractContextManager[State]:
        """A change of the database, under qubesd's rules (which depend on what runs)."""
        return self.database.transaction(self.runtime.is_running)


def parser(prog: str, description: str, **options: Any) -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(prog=prog, description=description, **options)
    result.add_argument("--verbose", "-v", action="count", default=0, help="increase verbosity")
    result.add_argument("--quiet", "-q", action="count", default=0, help="decrease verbosity")
    return result


def run(
    argument_parser: argparse.ArgumentParser,
    argv: list[str],
    body: Callable[[Context, argparse.Namespace], int | None],
) -> int:
    """Parse, enter dom0, run the tool; report QubesimErrors the way qubesadmin tools do."""
    arguments = argument_parser.parse_args(argv)
    if os.geteuid() != 0:
        argument_parser.exit(1, f"{argument_parser.prog}: error: qubesim's qvm tools need root\n")
    layout = current()
    try:
        dom0.ensure_in_dom0(layout)
        return body(Context(layout), arguments) or 0
    except UsageError as error:
        argument_parser.error(str(error))
    except QubesimError as error:
        print(f"{argument_parser.prog}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130
    return 1


def host_release() -> str:
    """The release of the host, for a tool whose options depend on it; the current release when
    the host cannot be read (the tool then refuses as it always does: no host, or not root)."""
    try:
        return Database(current()).read().release
    except (QubesimError, OSError):
        return release.CURRENT


# What makes a qube name a pattern (qubesadmin/tools/__init__.py, VmNameAction.parse_qubes_app).
WILDCARDS = "*?[!]"


def qube_names(state: State, words: list[str]) -> list[str]:
    """The qubes that the VMNAME words of a tool for several qubes name, as qubesadmin's
    VmNameAction reads them. From 4.3 a word with a wildcard is a pattern matched against every
    qube's name (dom0 included) and each qube comes once; 4.2 takes every word as a name, as
    often as it is given. A name that is no qube is an error (exit code 2)."""
    if not release.since(state.release, "4.3"):
        names = list(words)
    else:
        names = []
        for word in words:
            if any(wildcard in word for wildcard in WILDCARDS):
                names += [
                    name
                    for name in state.names()
                    if name not in names and fnmatch.fnmatchcase(name, word)
                ]
            elif word not in names:
                names.append(word)
    for name in names:
        state.qube(name)
    return names


def print_error(message: str, qubes_release: str) -> None:
    """qubesadmin's parser.print_error: a line on stderr, after "Error:" from 4.3."""
    prefix = ["Error:"] if release.since(qubes_release, "4.3") else []
    print(*prefix, message, file=sys.stderr, flush=True)


def log(logger: str, message: str) -> None:
    """A message logged by qubesadmin (qubesadmin/log.py FORMAT_CONSOLE): on stderr."""
    print(f"{logger}: {message}", file=sys.stderr, flush=True)


def print_table(rows: list[list[str]]) -> None:
    """qubesadmin.tools.print_table (`column -t`): columns two spaces apart."""
    if not rows:
        return
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        print("  ".join(cells).rstrip())
