"""qvm-service: enable or disable qube services (the `service.NAME` features, as in Qubes)."""

from __future__ import annotations

import argparse

from qubesim.errors import UsageError
from qubesim.tools.common import Context, parser, run

PREFIX = "service."
_ON = frozenset({"on", "true", "1", "enable", "enabled", "yes"})
_OFF = frozenset({"off", "false", "0", "disable", "disabled", "no", ""})


def _state_word(value: str) -> str:
    return "on" if value else "off"


def _change(context: Context, name: str, service: str, value: str | None) -> None:
    with context.database.transaction() as state:
        features = state.qube(name)["features"]
        if value is None:
            features.pop(PREFIX + service, None)
        else:
            features[PREFIX + service] = value


def _body(context: Context, arguments: argparse.Namespace) -> int:
    name = arguments.VMNAME
    context.state().qube(name)
    for service in arguments.enable:
        _change(context, name, service, "1")
    for service in arguments.disable:
        _change(context, name, service, "")
    for service in arguments.unset:
        _change(context, name, service, None)
    if arguments.enable or arguments.disable or arguments.unset:
        return 0
    features = context.state().qube(name)["features"]
    if arguments.service is None:
        services = {
            key[len(PREFIX) :]: value for key, value in features.items() if key.startswith(PREFIX)
        }
        width = max(map(len, services), default=0)
        for service in sorted(services):
            print(f"{service.ljust(width)}  {_state_word(services[service])}")
        return 0
    if arguments.value is None:
        if PREFIX + arguments.service not in features:
            return 1
        print(_state_word(features[PREFIX + arguments.service]))
        return 0
    word = arguments.value.lower()
    if word not in _ON | _OFF:
        raise UsageError(f"invalid service value: {arguments.value!r} (on or off)")
    _change(context, name, arguments.service, "1" if word in _ON else "")
    return 0


def main(argv: list[str]) -> int:
    tool = parser("qvm-service", "Enable, disable or list a qube's services.")
    tool.add_argument("--enable", "-e", action="append", default=[], metavar="SERVICE")
    tool.add_argument("--disable", "-d", action="append", default=[], metavar="SERVICE")
    tool.add_argument("--unset", "--default", "-D", action="append", default=[], metavar="SERVICE")
    tool.add_argument("VMNAME")
    tool.add_argument("service", nargs="?", metavar="SERVICE")
    tool.add_argument("value", nargs="?", metavar="on|off")
    return run(tool, argv, _body)
