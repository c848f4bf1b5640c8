"""dom0's qrexec daemon: takes calls from qubes' qrexec-client-vm over one Unix socket.

A call is one JSON line {"target", "service", "source"} (source: the requested source, usually
empty) with the caller's stdin, stdout and stderr attached (SCM_RIGHTS); the service runs with
them directly, so data never passes through dom0. The caller's qube is known from the kernel (the
peer's pid namespace), never from what it says. The answer is JSON lines: {"status": "refused"},
or {"status": "started"} then {"status": "exit", "code": N}.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import struct
import sys
import threading

from qubesim import daemon
from qubesim.errors import QubesimError
from qubesim.layout import current
from qubesim.qrexec import Call, Qrexec
from qubesim.runtime import Runtime

SOCKET_NAME = "qrexec.sock"
REQUEST_MAX = 70_000  # a target and a service at their limits, in JSON
STDIO_FDS = 3


def caller_qube(runtime: Runtime, names: list[str], pid: int) -> str | None:
    """The running qube whose pid namespace holds process `pid`."""
    try:
        namespace = os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None
    for name in names:
        running = runtime.running(name)
        if running is None:
            continue
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{running.pid}/ns/pid").st_ino == namespace:
                return name
    return None


def _receive(connection: socket.socket) -> tuple[bytes, list[int]]:
    """The request line and the descriptors that came with it (only the first message has them)."""
    fds_size = socket.CMSG_SPACE(STDIO_FDS * array.array("i").itemsize)
    data, ancillary, _, _ = connection.recvmsg(REQUEST_MAX, fds_size)
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
            fds.extend(received)
    while not data.endswith(b"\n") and len(data) < REQUEST_MAX:
        chunk = connection.recv(REQUEST_MAX - len(data))
        if not chunk:
            break
        data += chunk
    return data, fds


def _answer(connection: socket.socket, **answer: object) -> None:
    with contextlib.suppress(OSError):
        connection.sendall(json.dumps(answer).encode() + b"\n")


def _parse(data: bytes, fds: list[int]) -> tuple[str, str, str]:
    """(target, service, requested source) of a request."""
    if len(fds) != STDIO_FDS:
        raise QubesimError(f"expected {STDIO_FDS} descriptors, got {len(fds)}")
    request = json.loads(data.decode())
    target, service = request.get("target"), request.get("service")
    requested_source = request.get("source", "")
    if not all(isinstance(value, str) for value in (target, service, requested_source)):
        raise QubesimError("the request needs a target and a service")
    return target, service, requested_source


def handle(qrexec: Qrexec, connection: socket.socket) -> None:
    fds: list[int] = []
    try:
        credentials = connection.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
        )
        pid, _, _ = struct.unpack("3i", credentials)
        data, fds = _receive(connection)
        source = caller_qube(qrexec.runtime, qrexec.database.read().names(), pid)
        if source is None:
            raise QubesimError(f"a call from outside any running qube (pid {pid})")
        target, service, requested_source = _parse(data, fds)
        call = Call.parse(source, target, service)
        code = qrexec.call_from_qube(
            call, fds, lambda: _answer(connection, status="started"), requested_source
        )
        if code is None:
            _answer(connection, status="refused")
        else:
            _answer(connection, status="exit", code=code)
    except (QubesimError, ValueError, OSError) as error:
        print(f"qrexec: refused a call: {error}", file=sys.stderr, flush=True)
        _answer(connection, status="refused")
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        connection.close()


def serve(notify_fd: int) -> None:
    layout = current()
    layout.qrexec_socket_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    layout.qrexec_socket_dir.chmod(0o755)
    path = layout.qrexec_socket_dir / SOCKET_NAME
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    path.chmod(0o666)  # any user in a qube may call; policy decides
    server.listen(128)
    qrexec = Qrexec(layout)
    daemon.notify_ready(notify_fd)
    while True:
        connection, _ = server.accept()
        threading.Thread(target=handle, args=(qrexec, connection), daemon=True).start()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
