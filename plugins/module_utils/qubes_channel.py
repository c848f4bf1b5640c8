# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A framed channel into a qube over one qrexec stream (qubes.VMShell or qubes.VMRootShell).

The same file plays three parts, all with the standard library only:

* the agent, which runs in the qube: the connection plugin sends this file's source through the
  shell and runs it there with ``python3 -c``; it first prints a handshake line, then serves
  requests (run a command, write a file, read a file) read as frames from stdin;
* the multiplexer, which runs on the controller (``python3 qubes_channel.py mux ...``) and keeps
  one agent per qube and user alive between tasks, like ssh's ControlPersist, serving any number of
  clients over a Unix socket that only its user can reach;
* the client side, used by the connection plugin to talk to either.

Frames are ``type (1 byte) | request id (4) | length (4) | payload``. Payloads are bounded, and
nothing that comes from the qube is ever evaluated: exit information is JSON, output is bytes.
The qube may be compromised: on the controller side every wait has a deadline, every buffer and
file it feeds has a cap, and any text of its making is made printable before it is shown.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import queue
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import IO, Any, BinaryIO

HANDSHAKE = b"QUBES-CHANNEL 1\n"
HEADER = struct.Struct("!BII")
MAX_PAYLOAD = 1 << 20
CHUNK = 1 << 18

# Requests (controller -> agent)
EXEC = ord("X")  # payload: JSON {"cmd": str}; then STDIN frames, an empty one for end of input
STDIN = ord("I")
PUT = ord("P")  # payload: JSON {"path": str}; then DATA frames, an empty one to finish
DATA = ord("D")
FETCH = ord("F")  # payload: JSON {"path": str}
KILL = ord("K")  # end a running command (its whole process group)
# Answers (agent -> controller)
STDOUT = ord("O")
STDERR = ord("R")
EXIT = ord("E")  # payload: JSON {"rc": int, "error": str or null}; the request is over

STREAM_CLOSED = "the channel to the qube closed"
MALFORMED = "malformed message from the qube"
# How long a kill waits for the channel before it tears the stream down instead.
KILL_GRACE = 2.0
# How much of a failed stream's stderr the multiplexer passes on (the reason shows less).
REPORTED_STDERR = 4096
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e\n]")


class ChannelError(Exception):
    """The channel failed (not the command: its exit code comes in an EXIT frame)."""


class LimitExceeded(ChannelError):
    """The qube sent more than a cap allows; the request was killed."""


def printable(text: str, limit: int) -> str:
    """Text from the qube as it may be shown to the operator: printable ASCII and newlines only
    (no terminal escapes), at most the last `limit` characters."""
    return _NOT_PRINTABLE.sub("?", text[-limit:])


def pack(kind: int, request: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ChannelError("frame too large")
    return HEADER.pack(kind, request, len(payload)) + payload


def read_exact(stream: BinaryIO | socket.socket, size: int) -> bytes | None:
    """Read exactly size bytes from a binary file object or socket; None at a clean end."""
    parts = []
    remaining = size
    while remaining:
        if isinstance(stream, socket.socket):
            part = stream.recv(remaining)
        else:
            part = stream.read(remaining)
        if not part:
            if remaining == size:
                return None
            raise ChannelError(STREAM_CLOSED)
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


def read_frame(stream: BinaryIO | socket.socket) -> tuple[int, int, bytes] | None:
    """The next (kind, request, payload), or None when the stream ended between frames."""
    header = read_exact(stream, HEADER.size)
    if header is None:
        return None
    kind, request, length = HEADER.unpack(header)
    if length > MAX_PAYLOAD:
        raise ChannelError("oversized frame from the other side")
    payload = read_exact(stream, length) if length else b""
    if payload is None:
        raise ChannelError(STREAM_CLOSED)
    return kind, request, payload


def decode_json(payload: bytes) -> dict[str, Any]:
    """JSON from the other side, which must be an object; anything else is a channel error."""
    try:
        value = json.loads(payload.decode("utf-8"))
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
        raise ChannelError(MALFORMED) from None
    if not isinstance(value, dict):
        raise ChannelError(MALFORMED)
    return value


def decode_exit(payload: bytes) -> tuple[int, str | None]:
    """(rc, error) of an EXIT frame, checked: rc an int of a process's range, error text or null."""
    status = decode_json(payload)
    rc, error = status.get("rc"), status.get("error")
    if isinstance(rc, bool) or not isinstance(rc, int) or not -(1 << 31) <= rc < (1 << 31):
        raise ChannelError(MALFORMED)
    if error is not None and not isinstance(error, str):
        raise ChannelError(MALFORMED)
    return rc, error


def encode_json(value: dict[str, Any]) -> bytes:
    return json.dumps(value).encode("utf-8")


class FrameWriter:
    """Writes whole frames from several threads."""

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write
        self._lock = threading.Lock()

    def send(self, kind: int, request: int, payload: bytes = b"") -> None:
        frame = pack(kind, request, payload)
        with self._lock:
            self._write(frame)


# -- agent (in the qube) ---------------------------------------------------------------------------
class _Command:
    def __init__(self, writer: FrameWriter, request: int, command: str) -> None:
        self.writer = writer
        self.request = request
        self.process = subprocess.Popen(
            ["/bin/sh", "-c", command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # a timeout ends the command's whole process group
        )
        self._pumps = [
            threading.Thread(target=self._pump, args=(self.process.stdout, STDOUT)),
            threading.Thread(target=self._pump, args=(self.process.stderr, STDERR)),
        ]
        # Input goes through a queue and a thread of its own: a command that does not read (yet)
        # must not stall the agent, which serves other requests on the same stream.
        self._input: queue.Queue[bytes] = queue.Queue()
        feeder = threading.Thread(target=self._feed_input)
        for thread in [*self._pumps, feeder]:
            thread.daemon = True
            thread.start()
        waiter = threading.Thread(target=self._wait)
        waiter.daemon = True
        waiter.start()

    def _pump(self, stream: IO[bytes], kind: int) -> None:
        for chunk in iter(lambda: os.read(stream.fileno(), CHUNK), b""):
            self.writer.send(kind, self.request, chunk)

    def _wait(self) -> None:
        for pump in self._pumps:
            pump.join()
        code = self.process.wait()
        self.writer.send(EXIT, self.request, encode_json({"rc": code, "error": None}))

    def feed(self, data: bytes) -> None:
        """Queue input for the command; empty data is the end of input."""
        self._input.put(data)

    def _feed_input(self) -> None:
        stdin = self.process.stdin
        try:
            for data in iter(self._input.get, b""):
                stdin.write(data)
                stdin.flush()
        except (BrokenPipeError, ValueError):
            pass  # the command does not read its input: what it left is dropped, never run
        with contextlib.suppress(OSError):
            stdin.close()

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            os.killpg(self.process.pid, signal.SIGKILL)


class _Upload:
    """A file written next to its destination and renamed into place when complete."""

    def __init__(self, path: str) -> None:
        self.path = path
        directory = os.path.dirname(path) or "."
        self.fd, self.temporary = tempfile.mkstemp(prefix=".ansible-put-", dir=directory)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def finish(self) -> None:
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(self.fd, 0o666 & ~umask)
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
        os.rename(self.temporary, self.path)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        with contextlib.suppress(OSError):
            os.unlink(self.temporary)


def _error_text(error: OSError) -> str:
    return f"{error.filename}: {error.strerror}" if error.filename else str(error)


class Agent:
    def __init__(self, stdin: BinaryIO, stdout: BinaryIO) -> None:
        self.stdin = stdin
        self.stdout = stdout
        self.writer = FrameWriter(self._write_out)
        self.commands: dict[int, _Command] = {}
        self.uploads: dict[int, _Upload] = {}
        self.fetches: dict[int, threading.Event] = {}

    def _write_out(self, frame: bytes) -> None:
        # A buffered write may take only part of a large frame (a signal during a write to a
        # full pipe): the rest follows, or the stream would lose its framing.
        view = memoryview(frame)
        while view:
            view = view[self.stdout.write(view) :]
        self.stdout.flush()

    def _finish(self, request: int, code: int, error: str | None = None) -> None:
        self.writer.send(EXIT, request, encode_json({"rc": code, "error": error}))

    def _fetch(self, request: int, path: str, cancelled: threading.Event) -> None:
        try:
            with open(path, "rb") as source:
                for chunk in iter(lambda: source.read(CHUNK), b""):
                    if cancelled.is_set():
                        break
                    self.writer.send(STDOUT, request, chunk)
        except OSError as error:
            self._finish(request, 1, _error_text(error))
            return
        finally:
            self.fetches.pop(request, None)
        self._finish(request, 0)

    def _put(self, request: int, payload: bytes) -> None:
        upload = self.uploads.pop(request, None)
        if upload is None:
            return
        try:
            if payload:
                upload.write(payload)
                self.uploads[request] = upload
            else:
                upload.finish()
                self._finish(request, 0)
        except OSError as error:
            upload.abort()
            self._finish(request, 1, f"cannot write {upload.path}: {error.strerror}")

    def _start_put(self, request: int, path: str) -> None:
        try:
            self.uploads[request] = _Upload(path)
        except OSError as error:
            # The data frames that follow are dropped (no upload under this id).
            self._finish(request, 1, f"cannot write {path}: {error.strerror}")

    def handle(self, kind: int, request: int, payload: bytes) -> None:
        if kind == EXEC:
            command = decode_json(payload).get("cmd", "")
            self.commands[request] = _Command(self.writer, request, command)
        elif kind == STDIN and request in self.commands:
            self.commands[request].feed(payload)
        elif kind == KILL:
            self._kill(request)
        elif kind == PUT:
            self._start_put(request, decode_json(payload).get("path", ""))
        elif kind == DATA:
            self._put(request, payload)
        elif kind == FETCH:
            cancelled = self.fetches[request] = threading.Event()
            path = decode_json(payload).get("path", "")
            thread = threading.Thread(target=self._fetch, args=(request, path, cancelled))
            thread.daemon = True
            thread.start()

    def _kill(self, request: int) -> None:
        """End whatever the request is doing: a command, an upload (its temporary file goes) or
        a fetch (the controller gave up on it: timed out or over its size limit)."""
        if request in self.commands:
            self.commands[request].kill()
        upload = self.uploads.pop(request, None)
        if upload is not None:
            upload.abort()
        cancelled = self.fetches.get(request)
        if cancelled is not None:
            cancelled.set()

    def serve(self) -> None:
        while True:
            frame = read_frame(self.stdin)
            if frame is None:
                break
            self.handle(*frame)
            self._forget_finished()
        for command in self.commands.values():
            command.kill()

    def _forget_finished(self) -> None:
        for request in [r for r, c in self.commands.items() if c.process.poll() is not None]:
            del self.commands[request]


def run_agent() -> None:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    stdout.write(HANDSHAKE)
    stdout.flush()
    Agent(stdin, stdout).serve()


# -- controller side -------------------------------------------------------------------------------
class Reader:
    """Exact reads from a pipe or socket descriptor, each with a deadline (None: wait forever)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = bytearray()

    def read_exact(self, size: int, deadline: float | None = None) -> bytes | None:
        while len(self.buffer) < size:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([self.fd], [], [], remaining)[0]:
                    raise TimeoutError()
            chunk = os.read(self.fd, max(CHUNK, size - len(self.buffer)))
            if not chunk:
                if self.buffer:
                    raise ChannelError(STREAM_CLOSED)
                return None
            self.buffer.extend(chunk)
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def read_frame(self, deadline: float | None = None) -> tuple[int, int, bytes] | None:
        header = self.read_exact(HEADER.size, deadline)
        if header is None:
            return None
        kind, request, length = HEADER.unpack(header)
        if length > MAX_PAYLOAD:
            raise ChannelError("oversized frame from the other side")
        payload = self.read_exact(length, deadline) if length else b""
        if payload is None:
            raise ChannelError(STREAM_CLOSED)
        return kind, request, payload


def bootstrap_line(source: bytes) -> bytes:
    """The shell line that makes qubes.VMShell's bash run the agent; the source follows it."""
    size = len(source)
    loader = f"import sys; exec(compile(sys.stdin.buffer.read({size}), 'qubes_channel', 'exec'))"
    return f'exec python3 -c "{loader}" agent\n'.encode("ascii")


def agent_source() -> bytes:
    with open(os.path.abspath(__file__.replace(".pyc", ".py")), "rb") as source:
        return source.read()


class ConnectFailure(ChannelError):
    """The agent did not start: the stream's exit code and stderr say why."""

    def __init__(self, message: str, returncode: int | None = None, stderr: bytes = b"") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


class Transport:
    """One qrexec stream (qvm-run or qrexec-client-vm) running the agent in the qube.

    `timeout` bounds the whole handshake, a failed one included (what does not exit in time is
    killed), and then every write: a qube that leaves its input unread that long loses the stream.
    """

    def __init__(self, command: list[str], timeout: float) -> None:
        self.timeout = timeout
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,  # frames go straight to the pipe: nothing is left to flush on close
        )
        self._stdin = self.process.stdin.fileno()
        flags = fcntl.fcntl(self._stdin, fcntl.F_GETFL)
        fcntl.fcntl(self._stdin, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        self.stderr_tail = bytearray()
        self._drain = threading.Thread(target=self._drain_stderr)
        self._drain.daemon = True
        self._drain.start()
        self.reader = Reader(self.process.stdout.fileno())
        self.writer = FrameWriter(self.send_bytes)
        self._handshake(time.monotonic() + timeout)

    def _handshake(self, deadline: float) -> None:
        source = agent_source()
        try:
            self._write(bootstrap_line(source) + source, deadline)
            hello = self.reader.read_exact(len(HANDSHAKE), deadline)
        except TimeoutError:
            self.kill()
            raise ConnectFailure(f"no answer within {self.timeout} seconds") from None
        except (OSError, ChannelError):
            hello = None
        if hello == HANDSHAKE:
            return
        if hello is not None:
            self.kill()
            raise ConnectFailure("it answered the handshake with something else than the agent")
        returncode = self._exit_code(deadline)
        self._drain.join(2)
        raise ConnectFailure("the agent did not start", returncode, bytes(self.stderr_tail))

    def _exit_code(self, deadline: float) -> int | None:
        """The stream's exit code once it ended, or None when it had to be killed."""
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        try:
            return self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def _drain_stderr(self) -> None:
        for chunk in iter(lambda: os.read(self.process.stderr.fileno(), 4096), b""):
            self.stderr_tail.extend(chunk)
            del self.stderr_tail[:-65536]

    def _write(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._stdin, view) :]
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([], [self._stdin], [], remaining)[1]:
                    raise TimeoutError() from None

    def send_bytes(self, data: bytes) -> None:
        try:
            self._write(data, time.monotonic() + self.timeout)
        except TimeoutError:
            self.kill()
            raise ChannelError(
                f"the qube left its input unread for {self.timeout} seconds"
            ) from None

    def kill(self) -> None:
        """Tear the stream down at once: a writer or reader blocked on it gets an error."""
        with contextlib.suppress(OSError):
            self.process.kill()
        self.process.wait()

    def close(self, grace: float = 10) -> None:
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill()


class Result:
    def __init__(self) -> None:
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.rc = 1
        self.error: str | None = None


class Session:
    """Requests over one link: an agent's transport directly, or a multiplexer's socket.

    `teardown` breaks the link at once; it is used when a kill cannot be sent promptly (another
    writer is blocked on a qube that stopped reading), so that no kill waits behind it."""

    def __init__(
        self, send: Callable[[bytes], None], reader: Reader, teardown: Callable[[], None]
    ) -> None:
        self._send_unlocked = send
        self._send_lock = threading.Lock()
        self._reader = reader
        self._teardown = teardown
        self._next = 0

    def _send(self, frame: bytes) -> None:
        with self._send_lock:
            self._send_unlocked(frame)

    def _request_id(self) -> int:
        self._next += 1
        return self._next

    def _kill(self, request: int) -> None:
        if self._send_lock.acquire(timeout=KILL_GRACE):
            try:
                self._send_unlocked(pack(KILL, request))
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
        sink: Callable[[bytes], object] | None = None,
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
                result.stderr.extend(payload)
            elif kind == STDOUT:
                if sink is None:
                    result.stdout.extend(payload)
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
        self._send(pack(EXEC, request, encode_json({"cmd": command})))
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
        with contextlib.suppress(OSError, ValueError, ChannelError):
            for start in range(0, len(stdin), CHUNK):
                self._send(pack(STDIN, request, stdin[start : start + CHUNK]))
            self._send(pack(STDIN, request))

    def put(self, source: BinaryIO, path: str, timeout: float | None = None) -> Result:
        """Stream a local file object to path in the qube (atomic rename); return Result.
        TimeoutError past timeout seconds, after the partial file was removed in the qube."""
        request = self._request_id()
        deadline = time.monotonic() + timeout if timeout else None
        self._send(pack(PUT, request, encode_json({"path": path})))
        # An early answer (it cannot write the file) is seen while the data is still being sent.
        return self._exchange(request, lambda: self._send_file(request, source), deadline)

    def _send_file(self, request: int, source: BinaryIO) -> None:
        with contextlib.suppress(OSError, ValueError, ChannelError):
            for chunk in iter(lambda: source.read(CHUNK), b""):
                self._send(pack(DATA, request, chunk))
            self._send(pack(DATA, request))

    def fetch(
        self,
        path: str,
        sink: Callable[[bytes], object],
        timeout: float | None = None,
        limit: int | None = None,
    ) -> Result:
        """Stream a file of the qube into sink(bytes); return Result. After stopping it:
        TimeoutError past timeout seconds, LimitExceeded past limit bytes."""
        request = self._request_id()
        deadline = time.monotonic() + timeout if timeout else None
        self._send(pack(FETCH, request, encode_json({"path": path})))
        try:
            return self._collect(request, Result(), deadline, sink, limit)
        except (TimeoutError, LimitExceeded):
            self._kill(request)
            raise


# -- multiplexer (on the controller) ---------------------------------------------------------------
class Multiplexer:
    """Serves clients on a Unix socket over one agent; exits when idle or when the agent ends."""

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
        # stream that cannot take the kill is already being torn down (see Transport.send_bytes).
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
                with client_lock, contextlib.suppress(OSError):
                    client.sendall(pack(kind, client_request, payload))
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


def run_multiplexer(spec: dict[str, Any], notify_fd: int) -> int:
    """spec: {"command": [...], "socket": path, "idle": seconds, "timeout": seconds}."""
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
    if argv[:1] == ["agent"]:
        run_agent()
        return 0
    if argv[:1] == ["mux"] and len(argv) == 3:
        return run_multiplexer(json.loads(argv[1]), int(argv[2]))
    sys.stderr.write("usage: qubes_channel.py agent | mux SPEC_JSON NOTIFY_FD\n")
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
