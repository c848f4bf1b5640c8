"""qvm-ls: list qubes as a table or as raw data (qubesadmin/tools/qvm_ls.py).

A column is a known one (NAME, STATE, CLASS...) or else read as a property; a value that is None,
empty or absent prints as "-". 4.3 added the `prefs` format, the PRIV-POOL and ROOT-POOL columns,
the filters --class, --label, --exclude-tags, --prefs and sorting (--sort, --reverse,
--ignore-case); on 4.2 they do not exist, and qubes are listed by name.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from qubesim.errors import UsageError
from qubesim.model import State
from qubesim.release import since
from qubesim.tools.common import Context, host_release, parser, print_table, qube_names, run
from qubesim.tools.qvm_create import POOL

FORMATS = {
    "simple": ("name", "state", "class", "label", "template", "netvm"),
    "network": ("name", "state", "netvm", "ip", "ipback", "gateway"),
    "kernel": ("name", "state", "class", "template", "kernel", "kernelopts"),
    "full": ("name", "state", "class", "label", "qid", "xid", "uuid"),
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
# The format 4.3 added.
FORMATS_4_3 = {
    "prefs": ("name", "label", "template", "netvm", "vcpus", "initialmem", "maxmem", "virt_mode"),
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
        if since(state.release, "4.3"):
            self.special["PRIV-POOL"] = lambda name: self.pool(name, "private")
            self.special["ROOT-POOL"] = lambda name: self.pool(name, "root")

    def pool(self, name: str, volume: str) -> str | None:
        return POOL if volume in self.state.qube(name)["volumes"] else None

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


def _number(cell: str) -> int:
    """Table.write_table sort_numeric: a percentage by its number, what is no number as 0."""
    try:
        return int(cell.removesuffix("%"))
    except ValueError:
        return 0


def _sort_key(head: str, ignore_case: bool) -> Callable[[str], object]:
    if head in SORT_NUMERIC:
        return _number
    return (lambda cell: cell.upper()) if ignore_case else (lambda cell: cell)


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
    if arguments.exclude and not arguments.all:
        raise UsageError("--exclude can only be used with --all")
    names = qube_names(state, arguments.VMNAME) or state.names()
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
        columns = list({**FORMATS, **FORMATS_4_3}[arguments.format])
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
        key = _sort_key(sort, arguments.ignore_case)
        rows.sort(key=lambda row: key(row[index]), reverse=arguments.reverse)
    print_table([heads, *rows])


def _filter_and_sort_options(tool: argparse.ArgumentParser) -> None:
    """The options 4.3 added."""
    tool.add_argument("--class", dest="klass", nargs="+", metavar="CLASS")
    tool.add_argument("--label", nargs="+", metavar="LABEL")
    tool.add_argument("--exclude-tags", nargs="+", metavar="TAG", help="not these")
    tool.add_argument("--prefs", nargs="+", metavar="PREFERENCE=VALUE")
    tool.add_argument("--sort", default="NAME", metavar="COLUMN", help="sort on this column")
    tool.add_argument("--reverse", action="store_true", help="reverse the sort")
    tool.add_argument("--ignore-case", action="store_true", help="sort letters of any case alike")


def main(argv: list[str]) -> int:
    newer = since(host_release(), "4.3")
    formats = {**FORMATS, **FORMATS_4_3} if newer else FORMATS
    tool = parser("qvm-ls", "List qubes and their properties.")
    layout = tool.add_mutually_exclusive_group()
    layout.add_argument("--format", "-o", choices=sorted(formats), default="simple")
    layout.add_argument("--fields", "-O", metavar="FIELD,...", help="the columns to show")
    tool.add_argument("--raw-data", action="store_true", help="no header; fields separated by '|'")
    tool.add_argument("--raw-list", action="store_true", help="same as --raw-data --fields=name")
    tool.add_argument("--all", action="store_true", help="every qube, dom0 included")
    tool.add_argument("--exclude", action="append", default=[], metavar="VMNAME")
    tool.add_argument("--tags", nargs="+", metavar="TAG", help="qubes with one of these tags")
    for power in POWER_STATES:
        tool.add_argument(f"--{power}", action="store_true", help=f"{power} qubes only")
    if newer:
        _filter_and_sort_options(tool)
    else:
        tool.set_defaults(
            klass=None,
            label=None,
            exclude_tags=None,
            prefs=None,
            sort="NAME",
            reverse=False,
            ignore_case=False,
        )
    tool.add_argument("VMNAME", nargs="*")
    return run(tool, argv, _body)
