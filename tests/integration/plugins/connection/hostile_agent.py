#!/usr/bin/python3
"""A compromised qube's answer to the connection plugin, for the tests only (never shipped).

Root in the qube installs this as /usr/local/bin/python3, ahead of the real one on PATH. When the
plugin starts its agent (`python3 -c LOADER`, the agent's source on stdin), this reads that
source and misbehaves as /etc/hostile-agent-mode says; any other use of python3 goes to the real
interpreter. The modes that answer requests reuse the real agent and change one of its handlers.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

REAL_PYTHON = "/usr/bin/python3"
MODE_FILE = "/etc/hostile-agent-mode"
ESCAPES = "\x1b]0;owned\x07\x1b[2J\x1b[31mFORGED\x1b[0m"

Handler = Callable[[Any, int, int, bytes], bool]


def forever() -> None:
    while True:
        time.sleep(3600)


def garbage(channel: dict[str, Any]) -> None:
    """Answer the handshake with something else, then hold the stream open."""
    sys.stdout.buffer.write(b"HELLO FROM A COMPROMISED QUBE\n")
    sys.stdout.buffer.flush()
    forever()


def silent(channel: dict[str, Any]) -> None:
    forever()


def lying_stderr(channel: dict[str, Any]) -> None:
    """Fail the start with words that mimic dom0's tools."""
    sys.stderr.write("qvm-run: error: no such domain: 'sys-net'\n" + ESCAPES + "\n")
    sys.exit(1)


def deaf(channel: dict[str, Any]) -> None:
    """Answer the handshake, then never read the stream again."""
    sys.stdout.buffer.write(channel["HANDSHAKE"])
    sys.stdout.buffer.flush()
    forever()


def flood_output(agent: Any, kind: int, request: int, payload: bytes) -> bool:
    """Every command answers with endless output."""
    if kind != agent.channel["EXEC"]:
        return False
    chunk = b"A" * agent.channel["MAX_PAYLOAD"]
    stdout = agent.channel["STDOUT"]

    def send() -> None:
        while True:
            agent.writer.send(stdout, request, chunk)

    threading.Thread(target=send, daemon=True).start()
    return True


def flood_fetch(agent: Any, kind: int, request: int, payload: bytes) -> bool:
    """Every fetched file is endless."""
    if kind != agent.channel["FETCH"]:
        return False
    return flood_output(agent, agent.channel["EXEC"], request, payload)


def exit_frame(body: bytes) -> Handler:
    """Every command ends with this EXIT frame payload."""

    def handle(agent: Any, kind: int, request: int, payload: bytes) -> bool:
        if kind != agent.channel["EXEC"]:
            return False
        agent.writer.send(agent.channel["EXIT"], request, body)
        return True

    return handle


def escapes_on_put(agent: Any, kind: int, request: int, payload: bytes) -> bool:
    """Every upload fails with a message full of terminal escapes."""
    if kind == agent.channel["DATA"]:
        return True
    if kind != agent.channel["PUT"]:
        return False
    body = agent.channel["encode_json"]({"rc": 1, "error": ESCAPES})
    agent.writer.send(agent.channel["EXIT"], request, body)
    return True


def deaf_on_put(agent: Any, kind: int, request: int, payload: bytes) -> bool:
    """Serve commands, but stop reading the stream at the first upload."""
    if kind != agent.channel["PUT"]:
        return False
    forever()
    return True


HANDLERS: dict[str, Handler] = {
    "deaf-on-put": deaf_on_put,
    "flood-output": flood_output,
    "flood-fetch": flood_fetch,
    "nested-exit": exit_frame(b"[" * 200_000),
    "huge-exit": exit_frame(b'{"rc": 1e999, "error": null}'),
    "typed-exit": exit_frame(b'{"rc": "0", "error": ["x"]}'),
    "escapes-on-put": escapes_on_put,
}
STARTS: dict[str, Callable[[dict[str, Any]], None]] = {
    "garbage": garbage,
    "silent": silent,
    "lying-stderr": lying_stderr,
    "deaf": deaf,
}


def serve(channel: dict[str, Any], handler: Handler) -> None:
    class Hostile(channel["Agent"]):  # type: ignore[misc]
        def handle(self, kind: int, request: int, payload: bytes) -> None:
            if not handler(self, kind, request, payload):
                super().handle(kind, request, payload)

    Hostile.channel = channel
    stdout = sys.stdout.buffer
    stdout.write(channel["HANDSHAKE"])
    stdout.flush()
    Hostile(channel["Reader"](0), lambda buffers: os.writev(1, buffers)).serve()


def main(argv: list[str]) -> None:
    loader = re.fullmatch(r"-c\0(.*read\((\d+)\).*qubes_agent.*)", "\0".join(argv))
    if loader is None:
        os.execv(REAL_PYTHON, [REAL_PYTHON, *argv])
    source = sys.stdin.buffer.read(int(loader.group(2)))
    channel: dict[str, Any] = {"__name__": "qubes_agent"}  # not __main__: it does not start itself
    exec(compile(source, "qubes_agent", "exec"), channel)
    with open(MODE_FILE) as mode_file:
        mode = mode_file.read().strip()
    if mode in STARTS:
        STARTS[mode](channel)
    else:
        serve(channel, HANDLERS[mode])


if __name__ == "__main__":
    main(sys.argv[1:])
