# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The multiplexer: a process of the controller's user that keeps one agent per qube and user
alive between tasks, like ssh's ControlPersist, serving any number of clients over a Unix socket
that only its user can reach. It exits when idle or when the agent ends.

The connection plugin starts it with `command`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import socket
import sys
import threading
import time
from typing import Any

from ansible_collections.qubes_infra.build.plugins.plugin_utils.qubes_agent import (
    EXIT,
    HEADER,
    KILL,
    ChannelError,
    Reader,
    encode_json,
)
from ansible_collections.qubes_infra.build.plugins.plugin_utils.qubes_transport import (
    ConnectFailure,
    Transport,
    socket_sender,
)

# How much of a failed stream's stderr the multiplexer passes on (the reason shows less).
REPORTED_STDERR = 4096


# Runs this module as the main one with the directory holding `ansible_collections` in place of
# the current directory on the path (nothing in the environment, which qvm-run inherits, changes).
_START = (
    "import runpy, sys; sys.path[0] = sys.argv.pop(1);"
    " runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)"
)


def command(spec: dict[str, Any], notify_fd: int) -> list[str]:
    """The command that starts a multiplexer with the controller's Python, from wherever the
    collection was found (a checkout, an installed artifact). spec: {"command": [...], "socket":
    path, "idle": seconds, "timeout": seconds}; notify_fd: a descriptor it writes one JSON line to
    once the agent answered, or did not."""
    root = os.path.abspath(__file__)
    for _level in __name__.split("."):
        root = os.path.dirname(root)
    return [sys.executable, "-c", _START, root, __name__, json.dumps(spec), str(notify_fd)]


class Multiplexer:
    """Serves clients on a Unix socket over one agent."""

    def __init__(self, transport: Transport, listener: socket.socket, idle: float) -> None:
        self.transport = transport
        self.listener = listener
        self.idle = idle
        self.lock = threading.Lock()
        # agent request id <-> (client socket, the client's own request id)
        self.routes: dict[int, tuple[socket.socket, int]] = {}
        self.requests: dict[tuple[socket.socket, int], int] = {}
        self.client_locks: dict[socket.socket, threading.Lock] = {}
        self.next = 0
        self.clients = 0
        self.agent_gone = False
        self.last_activity = time.monotonic()

    def _route(self, client: socket.socket, request: int) -> int:
        with self.lock:
            key = (client, request)
            if key not in self.requests:
                self.next += 1
                self.requests[key] = self.next
                self.routes[self.next] = key
            self.last_activity = time.monotonic()
            return self.requests[key]

    def _serve_client(self, client: socket.socket) -> None:
        reader = Reader(client.fileno())
        try:
            while True:
                frame = reader.read_frame()
                if frame is None:
                    break
                kind, request, payload = frame
                self.transport.writer.send(kind, self._route(client, request), payload)
        except (OSError, ChannelError):
            pass
        finally:
            self._forget_client(client)

    def _forget_client(self, client: socket.socket) -> None:
        with self.lock:
            abandoned = [(k, v) for k, v in self.requests.items() if k[0] is client]
            for key, agent_request in abandoned:
                del self.requests[key]
                del self.routes[agent_request]
            self.clients -= 1
            self.client_locks.pop(client, None)
            self.last_activity = time.monotonic()
        # A client that went away (a killed worker) leaves no command running in the qube; a
        # stream that cannot take the kill is already being torn down (see Transport.send_buffers).
        with contextlib.suppress(OSError, ChannelError):
            for _key, agent_request in abandoned:
                self.transport.writer.send(KILL, agent_request)
        client.close()

    def _serve_agent(self) -> None:
        try:
            while True:
                frame = self.transport.reader.read_frame()
                if frame is None:
                    break
                kind, request, payload = frame
                with self.lock:
                    key = self.routes.get(request)
                    if key is not None and kind == EXIT:
                        del self.routes[request]
                        del self.requests[key]
                    client_lock = self.client_locks.get(key[0]) if key else None
                if key is None or client_lock is None:
                    continue
                client, client_request = key
                header = HEADER.pack(kind, client_request, len(payload))
                with client_lock, contextlib.suppress(OSError):
                    socket_sender(client)([header, payload])
        except (OSError, ChannelError):
            pass
        # The qube or the stream went away: clients see their sockets close, and serve() ends.
        with self.lock:
            self.agent_gone = True
            for client in self.client_locks:
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        client = self.listener.accept()[0]
        with self.lock:
            self.clients += 1
            self.client_locks[client] = threading.Lock()
            self.last_activity = time.monotonic()
        thread = threading.Thread(target=self._serve_client, args=(client,))
        thread.daemon = True
        thread.start()

    def _finished(self) -> bool:
        with self.lock:
            if self.agent_gone:
                return True
            idle_for = time.monotonic() - self.last_activity
            return self.clients == 0 and not self.routes and idle_for > self.idle

    def serve(self, path: str) -> None:
        agent = threading.Thread(target=self._serve_agent)
        agent.daemon = True
        agent.start()
        while True:
            if select.select([self.listener], [], [], 0.2)[0]:
                self._accept()
            elif self._finished():
                # First let no new client find this socket, then serve any that connected just
                # before: a client never reaches a multiplexer that is going away.
                with contextlib.suppress(OSError):
                    os.unlink(path)
                if not select.select([self.listener], [], [], 0)[0]:
                    break
        self.listener.close()
        self.transport.close()


def _listen(path: str) -> socket.socket:
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        os.makedirs(directory, 0o700)
    try:
        os.unlink(path)
    except OSError as error:
        if error.errno != errno.ENOENT:
            raise
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket is its user's only
    try:
        listener.bind(path)
    finally:
        os.umask(old_umask)
    listener.listen(64)
    return listener


def run(spec: dict[str, Any], notify_fd: int) -> int:
    """Start the agent, tell notify_fd how that went, then serve until idle."""
    try:
        transport = Transport(spec["command"], spec["timeout"])
    except ConnectFailure as failure:
        report = {
            "ok": False,
            "message": str(failure),
            "returncode": failure.returncode,
            "stderr": failure.stderr[-REPORTED_STDERR:].decode("utf-8", "replace"),
        }
        with contextlib.suppress(OSError):
            os.write(notify_fd, encode_json(report) + b"\n")
        return 1
    try:
        listener = _listen(spec["socket"])
        os.write(notify_fd, encode_json({"ok": True}) + b"\n")
        os.close(notify_fd)
    except OSError:
        # The client went away while the stream started (an interrupted run): end the stream
        # rather than leave it behind.
        transport.kill()
        return 1
    Multiplexer(transport, listener, spec["idle"]).serve(spec["socket"])
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: qubes_multiplexer SPEC_JSON NOTIFY_FD\n")
        return 2
    return run(json.loads(argv[0]), int(argv[1]))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
