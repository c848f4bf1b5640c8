"""qvm-ls: list qubes as a table or as raw data (qubesadmin/tools/qvm_ls.py).

A column is a known one (NAME, STATE, CLASS...) or else read as a property; a value that is None,
empty or absent prints as "-".
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from qubesim.errors import UsageError
from qubesim.model import State
from qubesim.tools.common import Context, parser, print_table, run

FORMATS = {
    "simple": ("name", "state", "class", "label", "template", "netvm"),
    "network": ("name", "state", "netvm", "ip", "ipback", "gateway"),
    "kernel": ("name", "state", "class", "template", "kernel", "kernelopts"),
    "full": ("name", "state", "class", "label", "qid", "xid", "uuid"),
    "prefs": ("name", "label", "template", "netvm", "vcpus", "initialmem", "maxmem", "virt_mode"),
    "disk": (
        "name",
        "state",
        "disk",
        "priv-curr",
        "priv-max",
        "priv-used",
        "root-curr",
        "root-max",
        "root-used",
    ),
}
# Table.write_table: the columns sorted as numbers
SORT_NUMERIC = {
    "MEMORY",
    "DISK",
    "PRIV-CURR",
    "PRIV-MAX",
    "ROOT-CURR",
    "XID",
    "ROOT-MAX",
    "MAXMEM",
    "QREXEC-TIMEOUT",
    "SHUTDOWN-TIMEOUT",
    "VCPUS",
    "PRIV-USED",
    "ROOT-USED",
}
POWER_STATES = ("running", "paused", "halted")


class Columns:
    """The value of a column for a qube, as qvm-ls computes it (None where it has none)."""

    def __init__(self, context: Context, state: State) -> None:
        self.context = context
        self.state = state
        self.special: dict[str, Callable[[str], object]] = {
            "STATE": context.runtime.power_state,
            "CLASS": lambda name: state.qube(name)["klass"],
            "PRIV-CURR": lambda name: state.qube(name)["volumes"].get("private"),
            "ROOT-CURR": lambda name: state.qube(name)["volumes"].get("root"),
        }

    @staticmethod
    def head(column: str) -> str:
        return column.upper().replace("_", "-")

    def cell(self, name: str, column: str) -> str:
        """Column.cell: an empty value prints as "-"."""
        head = self.head(column)
        if head in self.special:
            value = self.special[head](name)
        else:
            prop = column.lower().replace("-", "_")
            value = (
                self.state.get_property(name, prop) if self.state.has_property(name, prop) else None
            )
        return "-" if value is None or value == "" else str(value)


def _sort_key(head: str) -> Callable[[str], object]:
    if head in SORT_NUMERIC:
        return lambda cell: int(cell) if cell.isdigit() else 0
    return lambda cell: cell


def _by_prefs(state: State, names: list[str], prefs: list[str]) -> list[str]:
    """--prefs KEY=VALUE: str(value) == VALUE; an empty VALUE matches nothing (it means None)."""
    for pref in prefs:
        key, separator, wanted = pref.partition("=")
        if not separator or not key:
            raise UsageError(f"Invalid argument: --prefs {pref}")
        expected = None if wanted == "" else "" if wanted in ("''", '""') else wanted

        def matches(name: str, key: str = key, expected: str | None = expected) -> bool:
            value = state.get_property(name, key) if state.has_property(name, key) else None
            return str(value) == expected

        names = [name for name in names if matches(name)]
    return names


def _selected(context: Context, state: State, arguments: argparse.Namespace) -> list[str]:
    for name in arguments.VMNAME:
        state.qube(name)
    if arguments.exclude and not arguments.all:
        raise UsageError("--exclude can only be used with --all")
    names = arguments.VMNAME or state.names()
    if arguments.all:
        names = [name for name in state.names() if name not in arguments.exclude]
    if arguments.klass:
        names = [name for name in names if state.qube(name)["klass"] in arguments.klass]
    if arguments.label:
        names = [name for name in names if state.get_property(name, "label") in arguments.label]
    if arguments.tags:
        names = [name for name in names if set(arguments.tags) & set(state.qube(name)["tags"])]
    if arguments.exclude_tags:
        excluded = set(arguments.exclude_tags)
        names = [name for name in names if not excluded & set(state.qube(name)["tags"])]
    if arguments.prefs:
        names = _by_prefs(state, names, arguments.prefs)
    wanted = [power for power in POWER_STATES if getattr(arguments, power)]
    if wanted:
        names = [name for name in names if context.runtime.power_state(name).lower() in wanted]
    return sorted(names)


def _body(context: Context, arguments: argparse.Namespace) -> None:
    state = context.state()
    names = _selected(context, state, arguments)
    if arguments.raw_list:
        arguments.raw_data, arguments.fields = True, "name"
    if arguments.fields:
        columns = [column.strip() for column in arguments.fields.split(",")]
    else:
        columns = list(FORMATS[arguments.format])
    table = Columns(context, state)
    rows = [[table.cell(name, column) for column in columns] for name in names]
    if arguments.raw_data:
        for row in rows:
            print("|".join(row))
        return
    heads = [Columns.head(column) for column in columns]
    sort = arguments.sort.upper()
    if sort in heads:
        index = heads.index(sort)
        key = _sort_key(sort)
        rows.sort(key=lambda row: key(row[index]), reverse=arguments.reverse)
    print_table([heads, *rows])


def main(argv: list[str]) -> int:
    tool = parser("qvm-ls", "List qubes and their properties.")
    layout = tool.add_mutually_exclusive_group()
    layout.add_argument("--format", "-o", choices=sorted(FORMATS), default="simple")
    layout.add_argument("--fields", "-O", metavar="FIELD,...", help="the columns to show")
    tool.add_argument("--raw-data", action="store_true", help="no header; fields separated by '|'")
    tool.add_argument("--raw-list", action="store_true", help="same as --raw-data --fields=name")
    tool.add_argument("--all", action="store_true", help="every qube, dom0 included")
    tool.add_argument("--exclude", action="append", default=[], metavar="VMNAME")
    tool.add_argument("--class", dest="klass", nargs="+", metavar="CLASS")
    tool.add_argument("--label", nargs="+", metavar="LABEL")
    tool.add_argument("--tags", nargs="+", metavar="TAG", help="qubes with one of these tags")
    tool.add_argument("--exclude-tags", nargs="+", metavar="TAG", help="not these")
    for power in POWER_STATES:
        tool.add_argument(f"--{power}", action="store_true", help=f"{power} qubes only")
    tool.add_argument("--prefs", nargs="+", metavar="PREFERENCE=VALUE")
    tool.add_argument("--sort", default="NAME", metavar="COLUMN", help="sort on this column")
    tool.add_argument("--reverse", action="store_true", help="reverse the sort")
    tool.add_argument("VMNAME", nargs="*")
    return run(tool, argv, _body)
