"""qvm-volume: list volumes, show their properties, grow them."""

from __future__ import annotations

import argparse

from qubesim.errors import QubesimError, UsageError
from qubesim.model import State
from qubesim.sizes import parse_size
from qubesim.tools.common import Context, parser, run


def _split(reference: str) -> tuple[str, str]:
    qube, separator, volume = reference.partition(":")
    if not separator or not volume:
        raise UsageError(f"expected VM:VOLUME, not {reference!r}")
    return qube, volume


def _volumes(state: State, reference: str) -> tuple[str, str, dict[str, int]]:
    qube, volume = _split(reference)
    volumes = state.qube(qube)["volumes"]
    if volume not in volumes:
        raise UsageError(f"no such volume: {volume!r} (one of {', '.join(sorted(volumes))})")
    return qube, volume, volumes


def _info(context: Context, state: State, reference: str) -> dict[str, str]:
    qube, volume, volumes = _volumes(state, reference)
    klass = state.qube(qube)["klass"]
    outdated = volume == "root" and context.runtime.root_is_outdated(state, qube)
    return {
        "pool": "varlibqubes",
        "vid": f"{qube}/{volume}",
        "rw": "True" if volume != "kernel" else "False",
        "source": ""
        if volume != "root" or klass == "TemplateVM"
        else f"{state.get_property(qube, 'template')}/root",
        "save_on_stop": str(volume == "private" or (volume == "root" and klass == "TemplateVM")),
        "snap_on_start": str(volume == "root" and klass != "TemplateVM"),
        "size": str(volumes[volume]),
        "usage": "0",
        "is_outdated": str(outdated),
    }


def _body(context: Context, arguments: argparse.Namespace) -> None:
    if arguments.action in ("list", "ls"):
        state = context.state()
        names = [arguments.target] if arguments.target else state.names()
        for name in names:
            for volume, size in sorted(state.qube(name)["volumes"].items()):
                print(f"{name}:{volume}  {size}")
        return
    if not arguments.target:
        raise UsageError(f"{arguments.action} needs VM:VOLUME")
    if arguments.action == "info":
        info = _info(context, context.state(), arguments.target)
        if arguments.argument:
            if arguments.argument not in info:
                raise UsageError(f"no such volume property: {arguments.argument!r}")
            print(info[arguments.argument])
        else:
            width = max(map(len, info))
            for key, value in info.items():
                print(f"{key.ljust(width)}  {value}".rstrip())
        return
    if not arguments.argument:
        raise UsageError(f"{arguments.action} needs a size")
    size = parse_size(arguments.argument)
    with context.database.transaction() as state:
        _, volume, volumes = _volumes(state, arguments.target)
        if size < volumes[volume]:
            raise QubesimError(
                f"for your own safety, shrinking of {volume} volume is disabled "
                f"({size} < current {volumes[volume]} bytes)"
            )
        volumes[volume] = size


def main(argv: list[str]) -> int:
    tool = parser("qvm-volume", "Manage qube volumes.")
    tool.add_argument("action", choices=("list", "ls", "info", "extend", "resize"))
    tool.add_argument("target", nargs="?", metavar="VM:VOLUME")
    tool.add_argument("argument", nargs="?", metavar="SIZE|PROPERTY")
    return run(tool, argv, _body)
