"""The `qubesim` command: make the simulated host, enter dom0, remove it all."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from qubesim import audit, dom0, host, release, screen, world
from qubesim.errors import QubesimError
from qubesim.layout import current


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qubesim",
        description="A local simulator of the Qubes OS parts that the qubes_infra.build"
        " collection uses. State lives under $QUBESIM_HOME (default /var/lib/qubesim).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    init = commands.add_parser(
        "init",
        help="create dom0, the host's template and its minimal one, and sys-net, sys-firewall,"
        " sys-whonix, as a Qubes release has them",
    )
    init.add_argument(
        "--release",
        choices=release.RELEASES,
        help=f"the Qubes release to simulate (default: ${release.VARIABLE}, else the host's own,"
        f" else {release.CURRENT}); a host keeps the release it was made with",
    )
    commands.add_parser("info", help="print the host's release, home and templates")
    commands.add_parser("destroy", help="stop every qube and remove the simulated host")
    log = commands.add_parser("audit", help="print the qrexec audit log")
    log.add_argument("--since", type=audit.parse_since, help="ISO 8601 time or epoch seconds")
    log.add_argument("--json", action="store_true", help="one JSON object per line")
    asked = commands.add_parser(
        "questions",
        help="list the questions qubes ask the person at the screen (zenity's, as split-GPG's"
        " qubes.Gpg asks): id, time, the qube that shows it, the calling qube, state",
    )
    asked.add_argument("--json", action="store_true", help="one JSON object per line, with text")
    reply = commands.add_parser("answer", help="answer a pending question, as the person would")
    reply.add_argument("id", metavar="ID", help="QUBE:TOKEN, as `qubesim questions` lists it")
    reply.add_argument("reply", choices=screen.ANSWERS)
    outside = commands.add_parser(
        "world",
        help="the outside world on loopback: the logs repository behind sshd, qubes-builder and"
        " its release configurations behind git daemon",
    )
    outside.add_argument(
        "action",
        choices=["up", "down", "variables"],
        help="start (making it first), stop, or print the file of the collection's variables",
    )
    enter = commands.add_parser("dom0", help="run a command (default: a shell) as in dom0")
    enter.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND")
    return parser


def _world(outside: world.World, action: str) -> None:
    if action == "up":
        world.up(outside)
        print(f"qubesim: world up; the collection's variables are in {outside.variables_file}")
    elif action == "down":
        world.down(outside)
    else:
        print(outside.variables_file)


def main(argv: list[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    layout = current()
    try:
        if arguments.command == "init":
            wanted = release.requested(arguments.release, os.environ)
            made, created = host.initialise(layout, wanted)
            print(
                f"qubesim: Qubes {made} host ready at {layout.home}"
                + (f"; created {', '.join(created)}" if created else "")
            )
        elif arguments.command == "info":
            host.require_root()
            for key, value in host.describe(layout):
                print(f"{key}: {value}")
        elif arguments.command == "destroy":
            if not host.destroy(layout):
                print(f"qubesim: nothing to destroy at {layout.home}")
        elif arguments.command == "audit":
            host.require_root()
            for entry in audit.read(layout, arguments.since):
                print(
                    json.dumps(entry, sort_keys=True)
                    if arguments.json
                    else audit.format_entry(entry)
                )
        elif arguments.command == "questions":
            host.require_root()
            for question in screen.questions(layout):
                print(
                    json.dumps(dataclasses.asdict(question), sort_keys=True)
                    if arguments.json
                    else screen.format_question(question)
                )
        elif arguments.command == "answer":
            host.require_root()
            screen.answer(layout, arguments.id, arguments.reply)
        elif arguments.command == "world":
            host.require_root()
            _world(world.World(layout), arguments.action)
        else:
            host.require_root()
            command = arguments.argv[1:] if arguments.argv[:1] == ["--"] else arguments.argv
            dom0.enter(layout, command or ["/bin/bash", "-l"])
    except QubesimError as error:
        print(f"qubesim: error: {error}", file=sys.stderr)
        return error.exit_code
    return 0
