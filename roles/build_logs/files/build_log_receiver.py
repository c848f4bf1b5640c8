# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""qubesbuilder.BuildLog: store the build log a build qube streams, then publish it.

Run by /usr/local/etc/qubes-rpc/qubesbuilder.BuildLog in the logs qube; dom0 policy redirects
the build qubes' calls to dom0 here. The caller is the qrexec source
(QREXEC_REMOTE_DOMAIN), never anything it sends. The optional service argument names a
sub-folder.

Compatible with qubes-builder's receiver (file names, line format, frames, the stored name
printed back) and stricter: every line is on disk before the next one is read, so a build killed
mid-stream leaves every line it sent; line length and total size are bounded with an explicit
marker; the publishing step (signed commit, push, then telling the keys qube) is our own program,
never a hook from the repository, and its failure is the caller's exit code.
"""

from __future__ import annotations

import datetime
import lzma
import os
import re
import shutil
import sys
import time
from typing import Any, BinaryIO

# Installed side by side with its publishing step.
from build_log_publisher import PublishError, load_config, publish

QUBE_NAME = re.compile(r"^[a-zA-Z][a-zA-Z0-9_-]{0,30}$")
SUB_FOLDER_UNSAFE = re.compile(rb"[^A-Za-z0-9_-]")
# Bytes a log line keeps: printable ASCII; everything else (escapes, NUL, UTF-8) becomes '.'.
PRINTABLE = bytes(b if 0x20 <= b <= 0x7E else ord(".") for b in range(256))
READ_CHUNK = 1 << 16
LINE_TRUNCATED = b" [line truncated]"


def caller() -> str:
    source = os.environ.get("QREXEC_REMOTE_DOMAIN", "")
    if not QUBE_NAME.match(source):
        raise SystemExit("qubesbuilder.BuildLog: no valid caller (QREXEC_REMOTE_DOMAIN)")
    return source


def sub_folder(argv: list[str]) -> str:
    """The optional argument, made a single safe path element (as qubes-builder does)."""
    raw = argv[1] if len(argv) > 1 else os.environ.get("QREXEC_SERVICE_ARGUMENT", "")
    return SUB_FOLDER_UNSAFE.sub(b"_", raw.encode("utf-8", "replace")[:64]).decode("ascii")


def create_log(directory: str, started: datetime.datetime) -> tuple[str, int]:
    """A new file log_<start time>[.N] in directory, created exclusively."""
    os.makedirs(directory, mode=0o750, exist_ok=True)
    base = os.path.join(directory, started.strftime("log_%Y-%m-%d_%H-%M-%S"))
    for attempt in range(1000):
        path = base if attempt == 0 else f"{base}.{attempt}"
        try:
            return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except FileExistsError:
            continue
    raise SystemExit(f"qubesbuilder.BuildLog: too many logs named {base}")


class LogWriter:
    """Writes prefixed lines, each with one write() call; log lines up to a total size, after
    which one marker says so (the start and close frames are always written)."""

    def __init__(self, fd: int, source: str, max_bytes: int) -> None:
        self.fd = fd
        self.prefix = f" +0000 {source}: ".encode("ascii")
        self.remaining = max_bytes
        self.full = False
        self._second = -1
        self._stamp = b""

    def _record(self, text: bytes) -> bytes:
        """`<UTC %Y-%m-%d %H:%M:%S.%f> +0000 <source>: <text>`; the date is formatted once a
        second, since this runs for every line."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(second)).encode("ascii")
        micro = int((now - second) * 1_000_000)
        return b"%s.%06d%s%s\n" % (self._stamp, micro, self.prefix, text)

    def _write(self, record: bytes) -> None:
        view = memoryview(record)
        while view:
            view = view[os.write(self.fd, view) :]
        self.remaining -= len(record)

    def frame(self, text: bytes) -> None:
        self._write(self._record(text))

    def line(self, text: bytes) -> None:
        if self.full:
            return
        record = self._record(text)
        if len(record) > self.remaining:
            self.full = True
            record = self._record(b"> log truncated: size limit reached")
        self._write(record)


def read_lines(stream: BinaryIO, max_line: int) -> Any:
    """Lines of stream without their LF, each cut at max_line bytes (then marked), sanitised."""
    while True:
        line = stream.readline(max_line + 1)
        if not line:
            return
        if line.endswith(b"\n"):
            yield line[:-1].translate(PRINTABLE)
            continue
        if len(line) <= max_line:  # the last line, without LF
            yield line.translate(PRINTABLE)
            return
        yield line[:max_line].translate(PRINTABLE) + LINE_TRUNCATED
        # Drop the rest of the long line without holding it.
        rest = line[max_line:]
        while not rest.endswith(b"\n"):
            rest = stream.readline(READ_CHUNK)
            if not rest:
                return


def receive(stream: BinaryIO, fd: int, source: str, config: dict[str, Any]) -> None:
    writer = LogWriter(fd, source, int(config["max_log_bytes"]))
    writer.frame(b"> starting log")
    for line in read_lines(stream, int(config["max_line_bytes"])):
        writer.line(line)
    writer.frame(b"> closing log")


def compress(path: str) -> str:
    """path.xz in place of path; streams, so memory stays small whatever the size."""
    target = path + ".xz"
    # A fast preset: build logs are repetitive text, and the build waits for this before it
    # may sign; the last percent of size is not worth minutes.
    with open(path, "rb") as plain, lzma.open(target, "wb", preset=1) as packed:
        shutil.copyfileobj(plain, packed, 1 << 20)
    os.chmod(target, 0o640)
    os.unlink(path)
    return target


def main(argv: list[str]) -> int:
    config = load_config()
    source = caller()
    root = config["directory"]
    folder = os.path.join(root, source, sub_folder(argv))
    started = datetime.datetime.now(datetime.UTC)
    path, fd = create_log(os.path.normpath(folder), started)
    try:
        receive(sys.stdin.buffer, fd, source, config)
    finally:
        os.close(fd)
    if os.path.getsize(path) > int(config["compress_above_bytes"]):
        path = compress(path)
    # The stored name goes back to the build qube first, as qubes-builder's receiver does.
    sys.stdout.write(os.path.relpath(path, root) + "\n")
    sys.stdout.flush()
    try:
        publish(path, source, config)
    except PublishError as error:
        sys.stderr.write(f"qubesbuilder.BuildLog: {error}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
