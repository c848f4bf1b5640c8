# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The connection plugin's side of the channel into a qube: requests (run a command, put a file,
fetch a file) over one link, an agent's stream of its own or a multiplexer's socket.

The qube may be compromised: every wait has a deadline, every buffer and file it feeds has a cap,
and any text of its making is made printable before it is shown.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, BinaryIO

from ansible_collections.qubes_infra.build.plugins.plugin_utils.qubes_agent import (
    CHUNK,
    DATA,
    EXEC,
    EXIT,
    FETCH,
    HEADER,
    KILL,
    MALFORMED,
    PUT,
    STDERR,
    STDIN,
    STDOUT,
    STREAM_CLOSED,
    ChannelError,
    Reader,
    decode_json,
    encode_json,
)
from ansible_collections.qubes_infra.build.plugins.plugin_utils.qubes_transport import (
    Transport,
    socket_sender,
)

# How long a kill waits for the channel before it tears the stream down instead.
KILL_GRACE = 2.0
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e\n]")

if TYPE_CHECKING:
    from ansible_collections.qubes_infra.build.plugins.plugin_utils.qubes_agent import Buffer


class LimitExceeded(ChannelError):
    """The qube sent more than a cap allows; the request was killed."""


def printable(text: str, limit: int) -> str:
    """Text from the qube as it may be shown to the operator: printable ASCII and newlines only
    (no terminal escapes), at most the last `limit` characters."""
    return _NOT_PRINTABLE.sub("?", text[-limit:])


def decode_exit(payload: Buffer) -> tuple[int, str | None]:
    """(rc, error) of an EXIT frame, checked: rc an int of a process's range, error text or null."""
    status = decode_json(payload)
    rc, error = status.get("rc"), status.get("error")
    if isinstance(rc, bool) or not isinstance(rc, int) or not -(1 << 31) <= rc < (1 << 31):
        raise ChannelError(MALFORMED)
    if error is not None and not isinstance(error, str):
        raise ChannelError(MALFORMED)
    return rc, error


class Result:
    def __init__(self) -> None:
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.rc = 1
        self.error: str | None = None


class Session:
    """Requests over one link: an agent's transport directly, or a multiplexer's socket.

    `send_buffers` writes buffers whole; `teardown` breaks the link at once. It is used when a
    kill cannot be sent promptly (another writer is blocked on a qube that stopped reading), so
    that no kill waits behind it."""

    def __init__(
        self,
        send_buffers: Callable[[Sequence[Buffer]], None],
        reader: Reader,
        teardown: Callable[[], None],
    ) -> None:
        self._send_unlocked = send_buffers
        self._send_lock = threading.Lock()
        self._reader = reader
        self._teardown = teardown
        self._next = 0

    def _send(self, kind: int, request: int, payload: Buffer = b"") -> None:
        header = HEADER.pack(kind, request, len(payload))
        with self._send_lock:
            self._send_unlocked([header, payload])

    def _request_id(self) -> int:
        self._next += 1
        return self._next

    def _kill(self, request: int) -> None:
        if self._send_lock.acquire(timeout=KILL_GRACE):
            try:
                self._send_unlocked([HEADER.pack(KILL, request, 0)])
                return
            except (OSError, ChannelError):
                pass
            finally:
                self._send_lock.release()
        self._teardown()

    def _collect(
        self,
        request: int,
        result: Result,
        deadline: float | None,
        sink: Callable[[memoryview], object] | None = None,
        limit: int | None = None,
    ) -> Result:
        """Read the answers to request until its EXIT; output beyond limit bytes (stdout and
        stderr together) raises LimitExceeded."""
        received = 0
        while True:
            frame = self._reader.read_frame(deadline)
            if frame is None:
                raise ChannelError(STREAM_CLOSED)
            kind, answered, payload = frame
            if answered != request:
                continue  # an answer to an abandoned request (after a timeout)
            if kind == EXIT:
                result.rc, result.error = decode_exit(payload)
                return result
            received += len(payload)
            if limit is not None and received > limit:
                raise LimitExceeded(f"more than {limit} bytes")
            if kind == STDERR:
                result.stderr += payload
            elif kind == STDOUT:
                if sink is None:
                    result.stdout += payload
                else:
                    sink(payload)

    def run(
        self,
        command: str,
        stdin: bytes = b"",
        timeout: float | None = None,
        output_limit: int | None = None,
    ) -> Result:
        """Run a shell command; return its Result. After killing it: TimeoutError past timeout
        seconds, LimitExceeded past output_limit bytes of output."""
        request = self._request_id()
        self._send(EXEC, request, encode_json({"cmd": command}))
        # Input is sent while output is read: a command's output may fill every pipe on the way
        # before it reads all its input.
        deadline = time.monotonic() + timeout if timeout else None
        return self._exchange(
            request, lambda: self._send_input(request, stdin), deadline, output_limit
        )

    def _exchange(
        self,
        request: int,
        send: Callable[[], None],
        deadline: float | None,
        limit: int | None = None,
    ) -> Result:
        """Send a request's data from a thread of its own while its answer is collected, so the
        deadline holds even while a write waits on the qube. The request is killed when the
        deadline or the limit is passed."""
        sender = threading.Thread(target=send)
        sender.daemon = True
        sender.start()
        try:
            result = self._collect(request, Result(), deadline, limit=limit)
        except (TimeoutError, LimitExceeded):
            self._kill(request)
            raise
        sender.join(0 if deadline else None)
        return result

    def _send_input(self, request: int, stdin: bytes) -> None:
        data = memoryview(stdin)
        with contextlib.suppress(OSError, ValueError, ChannelError):
            for start in range(0, len(data), CHUNK):
                self._send(STDIN, request, data[start : start + CHUNK])
            self._send(STDIN, request)

    def put(self, source: BinaryIO, path: str, timeout: float | None = None) -> Result:
        """Stream a local file object to path in the qube (atomic rename); return Result.
        TimeoutError past timeout seconds, after the partial file was removed in the qube."""
        request = self._request_id()
        deadline = time.monotonic() + timeout if timeout else None
        self._send(PUT, request, encode_json({"path": path}))
        # An early answer (it cannot write the file) is seen while the data is still being sent.
        return self._exchange(request, lambda: self._send_file(request, source), deadline)

    def _send_file(self, request: int, source: BinaryIO) -> None:
        # One buffer for the whole file: each chunk is written out before the next is read in.
        buffer = memoryview(bytearray(CHUNK))
        with contextlib.suppress(OSError, ValueError, ChannelError):
            while size := source.readinto(buffer):
                self._send(DATA, request, buffer[:size])
            self._send(DATA, request)

    def fetch(
        self,
        path: str,
        sink: Callable[[memoryview], object],
        timeout: float | None = None,
        limit: int | None = None,
    ) -> Result:
        """Stream a file of the qube into sink (each chunk a view valid during the call); return
        Result. After stopping it: TimeoutError past timeout seconds, LimitExceeded past limit
        bytes."""
        request = self._request_id()
        deadline = time.monotonic() + timeout if timeout else None
        self._send(FETCH, request, encode_json({"path": path}))
        try:
            return self._collect(request, Result(), deadline, sink, limit)
        except (TimeoutError, LimitExceeded):
            self._kill(request)
            raise


def stream_session(stream: Transport) -> Session:
    """A session over an agent's stream of its own; a kill that cannot be sent kills the stream."""
    return Session(stream.send_buffers, stream.reader, stream.kill)


def shut_down(link: socket.socket) -> None:
    """End a socket for every thread using it (close alone leaves a blocked send blocked)."""
    with contextlib.suppress(OSError):
        link.shutdown(socket.SHUT_RDWR)


def socket_session(link: socket.socket) -> Session:
    """A session over a multiplexer's socket; a kill that cannot be sent shuts the socket down."""
    return Session(socket_sender(link), Reader(link.fileno()), lambda: shut_down(link))
