"""What the qvm tools share: argument parsing in qubesadmin's manner, and the error convention."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from qubesim import dom0
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
        return self.database.read()


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(prog=prog, description=description)
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
