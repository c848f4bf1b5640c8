"""qvm-prefs: list, get, set or reset a qube's properties (qubesadmin/tools/qvm_prefs.py)."""

from __future__ import annotations

import argparse

from qubesim.errors import UsageError
from qubesim.model import PROPERTIES
from qubesim.release import since
from qubesim.tools.common import Context, parser, run


def _list(context: Context, name: str, hide_default: bool) -> None:
    """Every property as `NAME  D|-  VALUE`; an empty qube reference is printed `None`."""
    state = context.state()
    properties = [prop for prop in sorted(PROPERTIES) if state.has_property(name, prop)]
    width = max(map(len, properties))
    for prop in properties:
        default = state.is_default(name, prop)
        if hide_default and default:
            continue
        value = state.get_property(name, prop)
        print(f"{prop.ljust(width)}  {'D' if default else '-'}  {value!s}")


def _get(context: Context, name: str, prop: str, hide_default: bool) -> None:
    """One value; nothing at all for None (an empty reference), as upstream. From 4.3
    --hide-default also hides a default value asked for by name (4.2 lists only without it)."""
    state = context.state()
    if hide_default and since(state.release, "4.3") and state.is_default(name, prop):
        return
    value = state.get_property(name, prop)
    if value is not None:
        print(value)


def _body(context: Context, arguments: argparse.Namespace) -> None:
    name = arguments.VMNAME
    context.state().qube(name)
    if arguments.property is None:
        if arguments.default or arguments.value is not None:
            raise UsageError("a property name is required to set or reset a value")
        _list(context, name, arguments.hide_default)
        return
    prop = arguments.property.replace("-", "_")
    if arguments.value is not None:
        with context.transaction() as state:
            state.set_property(name, prop, arguments.value)
    elif arguments.default:
        with context.transaction() as state:
            state.reset_property(name, prop)
    else:
        _get(context, name, prop, arguments.hide_default)


def main(argv: list[str]) -> int:
    tool = parser("qvm-prefs", "List, get, set or reset qube properties.")
    tool.add_argument(
        "--default", "-D", action="store_true", help="reset the property to its default"
    )
    tool.add_argument("--hide-default", action="store_true", help="skip default values")
    tool.add_argument("--get", "-g", action="store_true", help="ignored, for old scripts")
    tool.add_argument("--set", "-s", action="store_true", help="ignored, for old scripts")
    tool.add_argument("VMNAME")
    tool.add_argument("property", nargs="?", metavar="PROPERTY")
    tool.add_argument("value", nargs="?", metavar="VALUE")
    return run(tool, argv, _body)
