"""qvm-tags: list, add or remove a qube's tags."""

from __future__ import annotations

import argparse
import re

from qubesim.errors import QubesimError, UsageError
from qubesim.tools.common import Context, parser, run

_TAG = re.compile(r"[a-zA-Z0-9_-]+")


def _valid(tag: str) -> str:
    if not _TAG.fullmatch(tag):
        raise UsageError(f"invalid tag name: {tag!r} (letters, digits, '_' and '-' only)")
    return tag


def _body(context: Context, arguments: argparse.Namespace) -> int:
    name = arguments.VMNAME
    context.state().qube(name)
    if arguments.command in (None, "list", "ls", "l"):
        tags = context.state().qube(name)["tags"]
        if arguments.tags:
            missing = [tag for tag in arguments.tags if tag not in tags]
            return 1 if missing else 0
        for tag in sorted(tags):
            print(tag)
        return 0
    if not arguments.tags:
        raise UsageError(f"{arguments.command} needs at least one tag")
    with context.database.transaction() as state:
        tags = state.qube(name)["tags"]
        for tag in map(_valid, arguments.tags):
            if arguments.command in ("add", "a"):
                if tag not in tags:
                    tags.append(tag)
            elif tag in tags:
                tags.remove(tag)
            else:
                raise QubesimError(f"tag not set: {tag!r}")
    return 0


def main(argv: list[str]) -> int:
    tool = parser("qvm-tags", "List, add or remove a qube's tags.")
    tool.add_argument("VMNAME")
    tool.add_argument("command", nargs="?", choices=("list", "ls", "l", "add", "a", "del", "d"))
    tool.add_argument("tags", nargs="*", metavar="TAG")
    return run(tool, argv, _body)
