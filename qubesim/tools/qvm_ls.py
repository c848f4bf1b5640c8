"""qvm-ls: list qubes as a table, as names (--raw-list) or as fields (--raw-data --fields)."""

from __future__ import annotations

import argparse

from qubesim.errors import UsageError
from qubesim.model import PROPERTIES, State, format_value
from qubesim.tools.common import Context, parser, run

DEFAULT_FIELDS = ("name", "state", "class", "label", "template", "netvm")


def _field(context: Context, state: State, name: str, field: str) -> str:
    if field == "state":
        return context.runtime.power_state(name)
    if field == "class":
        field = "klass"
    if not state.has_property(name, field):
        return "-"
    value = state.get_property(name, field)
    return "-" if value is None else format_value(value)


def _selected(context: Context, state: State, arguments: argparse.Namespace) -> list[str]:
    for name in arguments.VMNAME:
        state.qube(name)
    names = arguments.VMNAME or state.names()
    if arguments.running:
        names = [name for name in names if context.runtime.is_running(name)]
    if arguments.halted:
        names = [name for name in names if not context.runtime.is_running(name)]
    if arguments.tags:
        wanted = set(arguments.tags)
        names = [name for name in names if wanted & set(state.qube(name)["tags"])]
    return names


def _body(context: Context, arguments: argparse.Namespace) -> None:
    state = context.state()
    names = _selected(context, state, arguments)
    if arguments.raw_list:
        print("\n".join(names))
        return
    fields = [
        field.strip().lower() for field in (arguments.fields or ",".join(DEFAULT_FIELDS)).split(",")
    ]
    for field in fields:
        if field not in ("state", "class") and field not in PROPERTIES:
            raise UsageError(f"no such field: {field!r}")
    rows = [[_field(context, state, name, field) for field in fields] for name in names]
    if arguments.raw_data:
        for row in rows:
            print("|".join(row))
        return
    table = [[field.upper() for field in fields], *rows]
    widths = [max(len(row[column]) for row in table) for column in range(len(fields))]
    for row in table:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def main(argv: list[str]) -> int:
    tool = parser("qvm-ls", "List qubes and their properties.")
    tool.add_argument("--raw-list", action="store_true", help="only the names, one per line")
    tool.add_argument("--raw-data", action="store_true", help="no header; fields separated by '|'")
    tool.add_argument(
        "--fields", "-O", help="comma-separated fields (default: " + ",".join(DEFAULT_FIELDS) + ")"
    )
    tool.add_argument("--running", action="store_true", help="only running qubes")
    tool.add_argument("--halted", action="store_true", help="only halted qubes")
    tool.add_argument("--tags", nargs="+", metavar="TAG", help="only qubes with one of these tags")
    tool.add_argument("VMNAME", nargs="*")
    return run(tool, argv, _body)
