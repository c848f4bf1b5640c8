# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The qrexec stream (qvm-run or qrexec-client-vm) that runs the agent in a qube, on the
controller. Used by the connection plugin directly (one-shot) and by the multiplexer.

The qube may be compromised: the handshake and every write have a deadline, and what the stream
says on stderr is kept bounded.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ansible_collections.qubes_infra.build.plugins.plugin_utils import qubes_agent
from ansible_collections.qubes_infra.build.plugins.plugin_utils.qubes_agent import (
    HANDSHAKE,
    ChannelError,
    FrameWriter,
    Reader,
    enlarge_pipe,
    write_all,
)

if TYPE_CHECKING:
    from ansible_collections.qubes_infra.build.plugins.plugin_utils.qubes_agent import Buffer

# How much of a failed stream's stderr is kept.
STDERR_KEPT = 65536


def agent_source() -> bytes:
    """The agent as it is sent into the qube: its module's file, whole."""
    with open(qubes_agent.__file__, "rb") as source:
        return source.read()


def bootstrap_line(source: bytes) -> bytes:
    """The shell line that makes qubes.VMShell's bash run the agent; the source follows it."""
    size = len(source)
    loader = f"import sys; exec(compile(sys.stdin.buffer.read({size}), 'qubes_agent', 'exec'))"
    return f'exec python3 -c "{loader}"\n'.encode("ascii")


class ConnectFailure(ChannelError):
    """The agent did not start: the stream's exit code and stderr say why."""

    def __init__(self, message: str, returncode: int | None = None, stderr: bytes = b"") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


class Transport:
    """One qrexec stream running the agent in the qube.

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
        for fd in (self._stdin, self.process.stdout.fileno()):
            enlarge_pipe(fd)
        self.stderr_tail = bytearray()
        self._drain = threading.Thread(target=self._drain_stderr)
        self._drain.daemon = True
        self._drain.start()
        self.reader = Reader(self.process.stdout.fileno())
        self.writer = FrameWriter(self.send_buffers)
        self._handshake(time.monotonic() + timeout)

    def _handshake(self, deadline: float) -> None:
        source = agent_source()
        try:
            self._write([bootstrap_line(source), source], deadline)
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
            del self.stderr_tail[:-STDERR_KEPT]

    def _write(self, buffers: Sequence[Buffer], deadline: float) -> None:
        def write(views: Sequence[Buffer]) -> int:
            while True:
                try:
                    return os.writev(self._stdin, views)
                except BlockingIOError:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not select.select([], [self._stdin], [], remaining)[1]:
                        raise TimeoutError() from None

        write_all(write, buffers)

    def send_buffers(self, buffers: Sequence[Buffer]) -> None:
        """Write buffers whole to the agent; a qube that leaves them unread for `timeout` seconds
        loses the stream."""
        try:
            self._write(buffers, time.monotonic() + self.timeout)
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


def socket_sender(link: socket.socket) -> Callable[[Sequence[Buffer]], None]:
    """Whole writes of buffers to a Unix socket (the multiplexer's clients and its own)."""
    return lambda buffers: write_all(link.sendmsg, buffers)
