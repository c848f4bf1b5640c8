"""qvm-service: a qube's services, the `service.NAME` features (qubesadmin/tools/qvm_service.py).

-e and -d take no argument: they give the value of the SERVICE named as a positional."""

from __future__ import annotations

import argparse
from argparse import SUPPRESS

from qubesim.errors import QubesimError, UsageError
from qubesim.tools.common import Context, parser, print_table, run

PREFIX = "service."
_ON = frozenset({"1", "yes", "true", "on"})
_OFF = frozenset({"0", "no", "false", "off"})


def _parse_bool(value: str) -> bool:
    """qvm_service.py parse_bool: these words, in any case, and nothing else."""
    if value.lower() in _ON | _OFF:
        return value.lower() in _ON
    raise QubesimError(f"Invalid literal for boolean value: {value!r}")


def _list(context: Context, name: str) -> None:
    features = context.state().qube(name)["features"]
    print_table(
        [
            [key[len(PREFIX) :], "on" if value else "off"]
            for key, value in features.items()
            if key.startswith(PREFIX)
        ]
    )


def _body(context: Context, arguments: argparse.Namespace) -> int:
    name = arguments.VMNAME
    context.state().qube(name)
    service = getattr(arguments, "service", None)
    value = getattr(arguments, "value", None)
    if service is None:
        if arguments.delete:
            raise UsageError("--unset requires a feature")
        _list(context, name)
        return 0
    key = PREFIX + service
    if arguments.delete:
        if value is not None:
            raise UsageError("cannot both set and unset a value")
        with context.transaction() as state:
            state.qube(name)["features"].pop(key, None)
        return 0
    if value is not None:
        enabled = _parse_bool(value)
        with context.transaction() as state:
            state.qube(name)["features"][key] = "1" if enabled else ""
        return 0
    features = context.state().qube(name)["features"]
    if key not in features:
        return 1
    print("on" if features[key] else "off")
    return 0


def main(argv: list[str]) -> int:
    # Absent positionals stay unset, so that -e/-d (which give `value`) are not overwritten.
    tool = parser(
        "qvm-service", "Enable, disable or list a qube's services.", argument_default=SUPPRESS
    )
    tool.add_argument("VMNAME")
    tool.add_argument("service", nargs="?", metavar="SERVICE")
    tool.add_argument("value", nargs="?", metavar="VALUE", help="on or off")
    tool.add_argument(
        "--unset",
        "--default",
        "--delete",
        "-D",
        dest="delete",
        action="store_true",
        default=False,
        help="unset the service (the qube's default applies)",
    )
    tool.add_argument(
        "--list", "-l", action="store_true", default=False, help="list services (the default)"
    )
    tool.add_argument(
        "--enable", "-e", dest="value", action="store_const", const="1", help="enable SERVICE"
    )
    tool.add_argument(
        "--disable", "-d", dest="value", action="store_const", const="0", help="disable SERVICE"
    )
    return run(tool, argv, _body)
