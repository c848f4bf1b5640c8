# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The agent of the qubes connection, and the protocol it speaks.

The connection sends this file's source into the qube through qubes.VMShell and runs it there with
the qube's ``python3 -c``, so it stays one file of the standard library only: it imports nothing
of the collection. It prints a handshake line, then serves requests (run a command, write a file,
read a file) read as frames from stdin, until stdin ends.

The controller's side (qubes_transport, qubes_client, qubes_multiplexer) imports the protocol from
here, so both ends share one definition of it: frames are
``kind (1 byte) | request id (4) | length (4) | payload``, payloads at most MAX_PAYLOAD bytes;
exit information is JSON, output is bytes, nothing received is ever evaluated.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:  # the qube's python3 may be older than the controller's: types only here
    from collections.abc import Callable, Sequence

    Buffer = bytes | bytearray | memoryview
    WriteBuffers = Callable[[Sequence[Buffer]], int]

HANDSHAKE = b"QUBES-CHANNEL 1\n"
HEADER = struct.Struct("!BII")
MAX_PAYLOAD = 1 << 20
# Data frames are as large as frames may be: fewer system calls and Python steps per byte.
CHUNK = MAX_PAYLOAD
# Pipes of this size hold a whole frame, so that a writer seldom waits for a reader's every step.
PIPE_SIZE = 1 << 20
# What a read may take beyond the frame it needs (the next headers and small frames).
READ_AHEAD = 1 << 16

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


class ChannelError(Exception):
    """The channel failed (not the command: its exit code comes in an EXIT frame)."""


def enlarge_pipe(fd: int) -> None:
    """Make the pipe at fd hold PIPE_SIZE bytes where the system allows it (F_SETPIPE_SZ is
    Linux's; anything that is not a pipe, or a limit below the size, keeps what it has)."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", 1031)
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, set_size, PIPE_SIZE)


def write_all(write: WriteBuffers, buffers: Sequence[Buffer]) -> None:
    """Write every byte of buffers with a gathering write (os.writev, socket.sendmsg), which may
    take only part of them: the rest follows, or the stream would lose its framing."""
    views = [memoryview(buffer) for buffer in buffers if len(buffer)]
    while views:
        written = write(views)
        while views and written >= len(views[0]):
            written -= len(views.pop(0))
        if written:
            views[0] = views[0][written:]


class FrameWriter:
    """Writes whole frames from several threads, header and payload in one gathering write: the
    payload is never copied into a frame."""

    def __init__(self, write_buffers: Callable[[Sequence[Buffer]], None]) -> None:
        self._write = write_buffers
        self._lock = threading.Lock()

    def send(self, kind: int, request: int, payload: Buffer = b"") -> None:
        if len(payload) > MAX_PAYLOAD:
            raise ChannelError("frame too large")
        header = HEADER.pack(kind, request, len(payload))
        with self._lock:
            self._write([header, payload])


class Reader:
    """Frames from a pipe or socket descriptor, each read with a deadline (None: wait forever).

    A frame's payload is a view of a buffer that the next read reuses: whoever keeps it copies it.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._ahead = bytearray()  # read beyond the last frame
        self._payload = bytearray(MAX_PAYLOAD)  # never resized: views of it stay valid

    def _wait(self, deadline: float | None) -> None:
        if deadline is None:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([self.fd], [], [], remaining)[0]:
            raise TimeoutError()

    def read_exact(self, size: int, deadline: float | None = None) -> bytes | None:
        """Exactly size bytes (a small size: a header, a handshake); None at a clean end."""
        while len(self._ahead) < size:
            self._wait(deadline)
            chunk = os.read(self.fd, max(READ_AHEAD, size - len(self._ahead)))
            if not chunk:
                if self._ahead:
                    raise ChannelError(STREAM_CLOSED)
                return None
            self._ahead += chunk
        data = bytes(self._ahead[:size])
        del self._ahead[:size]
        return data

    def _read_payload(self, length: int, deadline: float | None) -> memoryview:
        view = memoryview(self._payload)[:length]
        have = min(length, len(self._ahead))
        view[:have] = self._ahead[:have]
        del self._ahead[:have]
        while have < length:
            self._wait(deadline)
            got = os.readv(self.fd, [view[have:]])
            if not got:
                raise ChannelError(STREAM_CLOSED)
            have += got
        return view

    def read_frame(self, deadline: float | None = None) -> tuple[int, int, memoryview] | None:
        """The next (kind, request, payload), or None when the stream ended between frames."""
        header = self.read_exact(HEADER.size, deadline)
        if header is None:
            return None
        kind, request, length = HEADER.unpack(header)
        if length > MAX_PAYLOAD:
            raise ChannelError("oversized frame from the other side")
        return kind, request, self._read_payload(length, deadline)


def decode_json(payload: Buffer) -> dict[str, Any]:
    """JSON from the other side, which must be an object; anything else is a channel error."""
    try:
        value = json.loads(bytes(payload).decode("utf-8"))
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
        raise ChannelError(MALFORMED) from None
    if not isinstance(value, dict):
        raise ChannelError(MALFORMED)
    return value


def encode_json(value: dict[str, Any]) -> bytes:
    return json.dumps(value).encode("utf-8")


# -- the agent's requests ----------------------------------------------------------------------
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
    """A file written next to its destination and renamed into place when complete: nothing
    ever sees a part of it under its name. It is not synced to disk, as no Ansible connection
    syncs what it puts: the file is a module's or a task's input, and the module that moves it
    into place decides what is durable; a sync here would hold every put to the disk's pace."""

    def __init__(self, path: str) -> None:
        self.path = path
        directory = os.path.dirname(path) or "."
        self.fd, self.temporary = tempfile.mkstemp(prefix=".ansible-put-", dir=directory)

    def write(self, data: memoryview) -> None:
        while data:
            data = data[os.write(self.fd, data) :]

    def finish(self) -> None:
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(self.fd, 0o666 & ~umask)
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
    """Serves the frames of `reader`, answering through `write_buffers` (a gathering write that
    may write only part, as os.writev)."""

    def __init__(self, reader: Reader, write_buffers: WriteBuffers) -> None:
        self.reader = reader
        self.writer = FrameWriter(lambda buffers: write_all(write_buffers, buffers))
        self.commands: dict[int, _Command] = {}
        self.uploads: dict[int, _Upload] = {}
        self.fetches: dict[int, threading.Event] = {}

    def _finish(self, request: int, code: int, error: str | None = None) -> None:
        self.writer.send(EXIT, request, encode_json({"rc": code, "error": error}))

    def _fetch(self, request: int, path: str, cancelled: threading.Event) -> None:
        # One buffer for the whole file: each chunk is sent before the next is read into it.
        buffer = memoryview(bytearray(CHUNK))
        try:
            with open(path, "rb", buffering=0) as source:
                while not cancelled.is_set():
                    size = source.readinto(buffer)
                    if not size:
                        break
                    self.writer.send(STDOUT, request, buffer[:size])
        except OSError as error:
            self._finish(request, 1, _error_text(error))
            return
        finally:
            self.fetches.pop(request, None)
        self._finish(request, 0)

    def _put(self, request: int, payload: memoryview) -> None:
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

    def handle(self, kind: int, request: int, payload: memoryview) -> None:
        """One request's frame; payload is valid until the next frame is read."""
        if kind == EXEC:
            command = decode_json(payload).get("cmd", "")
            self.commands[request] = _Command(self.writer, request, command)
        elif kind == STDIN and request in self.commands:
            self.commands[request].feed(bytes(payload))
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
            frame = self.reader.read_frame()
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
    """Serve stdin and stdout, the stream's ends (read and written unbuffered: frames are read
    and written whole by the reader and write_all)."""
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    for fd in (stdin, stdout):
        enlarge_pipe(fd)
    write_all(lambda buffers: os.writev(stdout, buffers), [HANDSHAKE])
    Agent(Reader(stdin), lambda buffers: os.writev(stdout, buffers)).serve()


if __name__ == "__main__":
    run_agent()
