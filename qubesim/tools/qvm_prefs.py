"""qvm-prefs: list, get, set or reset a qube's properties."""

from __future__ import annotations

import argparse

from qubesim.errors import UsageError
from qubesim.model import PROPERTIES, format_value
from qubesim.tools.common import Context, parser, run


def _list(context: Context, name: str, hide_default: bool) -> None:
    state = context.state()
    properties = [prop for prop in sorted(PROPERTIES) if state.has_property(name, prop)]
    width = max(map(len, properties))
    for prop in properties:
        default = state.is_default(name, prop)
        if hide_default and default:
            continue
        value = format_value(state.get_property(name, prop))
        print(f"{prop.ljust(width)}  {'D' if default else '-'}  {value}".rstrip())


def _body(context: Context, arguments: argparse.Namespace) -> None:
    name = arguments.VMNAME
    context.state().qube(name)
    if arguments.property is None:
        if arguments.default or arguments.value is not None:
            raise UsageError("a property name is required to set or reset a value")
        _list(context, name, arguments.hide_default)
    elif arguments.default:
        if arguments.value is not None:
            raise UsageError("--default takes no value")
        with context.database.transaction() as state:
            state.reset_property(name, arguments.property)
    elif arguments.value is None:
        print(format_value(context.state().get_property(name, arguments.property)))
    else:
        with context.database.transaction() as state:
            state.set_property(name, arguments.property, arguments.value)


def main(argv: list[str]) -> int:
    tool = parser("qvm-prefs", "List, get, set or reset qube properties.")
    tool.add_argument(
        "--default", "-D", action="store_true", help="reset the property to its default"
    )
    tool.add_argument("--hide-default", action="store_true", help="when listing, skip defaults")
    tool.add_argument("VMNAME")
    tool.add_argument("property", nargs="?", metavar="PROPERTY")
    tool.add_argument("value", nargs="?", metavar="VALUE")
    return run(tool, argv, _body)
