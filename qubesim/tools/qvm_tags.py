"""qvm-tags: list, query, add or remove a qube's tags (qubesadmin/tools/qvm_tags.py)."""

from __future__ import annotations

import argparse
import re

from qubesim.errors import QubesimError
from qubesim.tools.common import Context, parser, run

# qubes/vm/__init__.py Tags: ASCII letters and digits, '_' and '-'
_TAG = re.compile(r"[a-zA-Z0-9_-]+")
_ALIASES = {
    "list": ("ls", "l"),
    "add": ("a", "set"),
    "del": ("d", "unset", "u"),
}


def _valid(tag: str) -> str:
    if not _TAG.fullmatch(tag):
        raise QubesimError(f"Invalid tag: {tag!r} (letters, digits, '_' and '-' only)")
    return tag


def _query(context: Context, arguments: argparse.Namespace) -> int:
    tags = context.state().qube(arguments.VMNAME)["tags"]
    tag = getattr(arguments, "tag", None)
    if tag is None:
        for present in sorted(tags):
            print(present)
        return 0
    if tag not in tags:
        return 1
    print(tag)
    return 0


def _add(context: Context, arguments: argparse.Namespace) -> int:
    with context.transaction() as state:
        tags = state.qube(arguments.VMNAME)["tags"]
        for tag in map(_valid, arguments.tag):
            if tag not in tags:
                tags.append(tag)
    return 0


def _delete(context: Context, arguments: argparse.Namespace) -> int:
    """Deleting a tag the qube does not have is no error (upstream's Tags.discard)."""
    with context.transaction() as state:
        tags = state.qube(arguments.VMNAME)["tags"]
        for tag in arguments.tag:
            if tag in tags:
                tags.remove(tag)
    return 0


def _body(context: Context, arguments: argparse.Namespace) -> int:
    context.state().qube(arguments.VMNAME)
    return arguments.action(context, arguments)


def main(argv: list[str]) -> int:
    tool = parser("qvm-tags", "List, add or remove a qube's tags.")
    tool.add_argument("VMNAME")
    commands = tool.add_subparsers(dest="command", title="commands")
    listing = commands.add_parser("list", aliases=_ALIASES["list"], help="list tags")
    listing.add_argument("tag", nargs="?", default=None, metavar="TAG")
    listing.set_defaults(action=_query)
    adding = commands.add_parser("add", aliases=_ALIASES["add"], help="add tags")
    adding.add_argument("tag", nargs="+", metavar="TAG")
    adding.set_defaults(action=_add)
    deleting = commands.add_parser("del", aliases=_ALIASES["del"], help="remove a tag")
    deleting.add_argument("tag", nargs=1, metavar="TAG")
    deleting.set_defaults(action=_delete)
    tool.set_defaults(action=_query)
    return run(tool, argv, _body)
