# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""qubesbuilder.BuildLog: store the build log a build qube streams, then publish it.

Run by /usr/local/etc/qubes-rpc/qubesbuilder.BuildLog in the logs qube; dom0 policy redirects
the build qubes' calls to dom0 here. The caller is the qrexec source
(QREXEC_REMOTE_DOMAIN), never anything it sends. The optional service argument names a
sub-folder.

Compatible with qubes-builder's receiver (file names, line format, frames, the stored name
printed back) and stricter: whatever the build qube sent is on disk before the receiver waits
for more (each read's complete lines are written, in one write, before the next read), so a
build killed mid-stream leaves every line it sent; line length and total size are bounded with
an explicit marker; the stored file (compressed when large) is capped below the remote's file
limit, cut with a marker past it; the publishing step (signed commit, push, then telling the
keys qube) is our own program, never a hook from the repository, and its failure is the
caller's exit code.

Bounds a caller can make this process use: one read (64 KiB) plus one unfinished line
(max_line_bytes) of memory; max_log_bytes of plain text on disk while it streams, then at most
max_stored_bytes once stored. A caller streams at most max_streams logs at once (a call past
that is refused before anything is read or stored), so the disk one caller can take is its
quota of stored logs plus max_streams x max_log_bytes while they stream.
"""

from __future__ import annotations

import datetime
import fcntl
import lzma
import os
import re
import sys
import time
from collections.abc import Iterator

from qubes_infra_services.build_log_publisher import PublishError, load_config, publish
from qubes_infra_services.definitions import qube_name_problem

SUB_FOLDER_UNSAFE = re.compile(rb"[^A-Za-z0-9_-]")
# Bytes a log line keeps: printable ASCII; everything else (escapes, NUL, UTF-8) becomes '.'.
# LF is kept here only to split lines after translating a whole read at once.
PRINTABLE = bytes(b if 0x20 <= b <= 0x7E or b == 0x0A else ord(".") for b in range(256))
READ_CHUNK = 1 << 16
LINE_TRUNCATED = b" [line truncated]"
LOG_TRUNCATED = b"> log truncated: size limit reached"
STORED_TRUNCATED = b"> log truncated: stored size limit reached"
# Compressed bytes the xz encoder may still hold (an LZMA2 chunk is at most 64 KiB compressed),
# plus the container's trailer and the closing lines: kept free under max_stored_bytes.
XZ_RESERVE = 1 << 17
XZ_PIECE = 1 << 16
# Beside the clone (never in it, nor in its .git, which need not exist yet): a lock file per
# stream slot of each caller.
STREAMS_SUFFIX = ".streams"


def caller() -> str:
    source = os.environ.get("QREXEC_REMOTE_DOMAIN", "")
    problem = qube_name_problem(source)
    if problem is not None:
        raise SystemExit(
            f"qubesbuilder.BuildLog: no valid caller (QREXEC_REMOTE_DOMAIN): {problem}"
        )
    return source


def sub_folder(argv: list[str]) -> str:
    """The optional argument, made a single safe path element (as qubes-builder does)."""
    raw = argv[1] if len(argv) > 1 else os.environ.get("QREXEC_SERVICE_ARGUMENT", "")
    return SUB_FOLDER_UNSAFE.sub(b"_", raw.encode("utf-8", "replace")[:64]).decode("ascii")


def claim_stream(root: str, source: str, max_streams: int) -> int:
    """A descriptor holding one of source's max_streams stream slots (a lock the kernel drops
    when this process ends, however it ends); SystemExit when all are held."""
    folder = os.path.join(os.path.normpath(root) + STREAMS_SUFFIX, source)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    for slot in range(max_streams):
        fd = os.open(os.path.join(folder, str(slot)), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            os.close(fd)
    raise SystemExit(
        f"qubesbuilder.BuildLog: {source} already streams {max_streams} logs"
        " (build_logs_max_streams_per_caller): refused"
    )


def create_log(directory: str, started: datetime.datetime) -> tuple[str, int]:
    """A new file log_<start time>[.N] in directory, created exclusively and locked: the
    publishing step leaves a locked file alone (it is being written)."""
    os.makedirs(directory, mode=0o750, exist_ok=True)
    base = os.path.join(directory, started.strftime("log_%Y-%m-%d_%H-%M-%S"))
    for attempt in range(1000):
        path = base if attempt == 0 else f"{base}.{attempt}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except FileExistsError:
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        return path, fd
    raise SystemExit(f"qubesbuilder.BuildLog: too many logs named {base}")


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class LogWriter:
    """Writes prefixed lines, a batch with one write() call; log lines up to a total size,
    after which one marker says so (the start and close frames are always written)."""

    def __init__(self, fd: int, source: str, max_bytes: int) -> None:
        self.fd = fd
        self.prefix = f" +0000 {source}: ".encode("ascii")
        self.remaining = max_bytes
        self.full = False
        self._second = -1
        self._stamp = b""

    def _head(self) -> bytes:
        """`<UTC %Y-%m-%d %H:%M:%S.%f> +0000 <source>: `; the date is formatted once a second."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(second)).encode("ascii")
        return b"%s.%06d%s" % (self._stamp, int((now - second) * 1_000_000), self.prefix)

    def record(self, text: bytes) -> bytes:
        return self._head() + text + b"\n"

    def _write(self, data: bytes) -> None:
        write_all(self.fd, data)
        self.remaining -= len(data)

    def frame(self, text: bytes) -> None:
        self._write(self.record(text))

    def lines(self, texts: list[bytes]) -> None:
        """Lines received together: one time stamp (when they arrived), one write."""
        if self.full:
            return
        head = self._head()
        batch = head + (b"\n" + head).join(texts) + b"\n"
        if len(batch) <= self.remaining:
            self._write(batch)
            return
        # The size limit falls inside this batch: the lines that fit, then the marker.
        kept = []
        room = self.remaining
        for text in texts:
            room -= len(head) + len(text) + 1
            if room < 0:
                break
            kept.append(head + text + b"\n")
        self.full = True
        self._write(b"".join(kept) + head + LOG_TRUNCATED + b"\n")


def _cut(text: bytes, max_line: int) -> bytes:
    return text if len(text) <= max_line else text[:max_line] + LINE_TRUNCATED


def read_batches(fd: int, max_line: int) -> Iterator[list[bytes]]:
    """The complete lines of each read of fd, without their LF, sanitised, each cut at
    max_line bytes (then marked); the last line may lack its LF. Holds at most one unfinished
    line of max_line bytes between reads: the rest of a longer one is dropped unread."""
    pending = b""
    dropping = False  # inside a line already cut: skip to its LF
    while True:
        data = os.read(fd, READ_CHUNK)
        if not data:
            break
        if dropping:
            end = data.find(b"\n")
            if end < 0:
                continue
            data, dropping = data[end + 1 :], False
        texts = (pending + data).translate(PRINTABLE).split(b"\n")
        pending = texts.pop()
        if len(pending) > max_line:
            texts.append(pending)
            pending, dropping = b"", True
        if texts:
            if max(map(len, texts)) > max_line:
                texts = [_cut(text, max_line) for text in texts]
            yield texts
    if pending:
        yield [pending]


def receive(fd_in: int, writer: LogWriter, max_line: int) -> None:
    writer.frame(b"> starting log")
    for texts in read_batches(fd_in, max_line):
        writer.lines(texts)
    writer.frame(b"> closing log")


def compress(path: str, writer: LogWriter, max_bytes: int) -> tuple[str, int, bool]:
    """path.xz (created and locked) in place of path, at most max_bytes: past that the log is
    cut at a line and closed with a marker. Streams, so memory stays small whatever the size.
    Returns the new path, its open descriptor (the lock) and whether the log was cut."""
    target = path + ".xz"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.fchmod(fd, 0o640)
    # A fast preset: build logs are repetitive text, and the build waits for this before it
    # may sign; the last percent of size is not worth minutes.
    packer = lzma.LZMACompressor(preset=1)
    written, cut, carry = 0, False, b""
    with open(path, "rb") as plain:
        while piece := carry + plain.read(XZ_PIECE):
            end = piece.rfind(b"\n") + 1 or len(piece)
            piece, carry = piece[:end], piece[end:]
            # Worst case the piece does not shrink at all.
            if written + len(piece) + XZ_RESERVE > max_bytes:
                cut = True
                break
            packed = packer.compress(piece)
            write_all(fd, packed)
            written += len(packed)
    if cut:
        tail = writer.record(STORED_TRUNCATED) + writer.record(b"> closing log")
        write_all(fd, packer.compress(tail))
    write_all(fd, packer.flush())
    os.unlink(path)
    return target, fd, cut


def main(argv: list[str]) -> int:
    config = load_config()
    source = caller()
    root = config["directory"]
    claim_stream(root, source, int(config["max_streams"]))  # held until this process ends
    folder = os.path.join(root, source, sub_folder(argv))
    started = datetime.datetime.now(datetime.UTC)
    path, fd = create_log(os.path.normpath(folder), started)
    writer = LogWriter(fd, source, int(config["max_log_bytes"]))
    max_stored = int(config["max_stored_bytes"])
    try:
        receive(sys.stdin.fileno(), writer, int(config["max_line_bytes"]))
        size = os.fstat(fd).st_size
        if size > min(int(config["compress_above_bytes"]), max_stored):
            path, lock, cut = compress(path, writer, max_stored)
            os.close(fd)
            fd = lock
            if cut:
                sys.stderr.write(
                    f"qubesbuilder.BuildLog: the log was cut at {max_stored} bytes stored"
                    " (build_logs_max_stored_bytes)\n"
                )
        # The stored name goes back to the build qube first, as qubes-builder's receiver does.
        sys.stdout.write(os.path.relpath(path, root) + "\n")
        sys.stdout.flush()
        try:
            publish(path, source, config)
        except PublishError as error:
            sys.stderr.write(f"qubesbuilder.BuildLog: {error}\n")
            return 1
        return 0
    finally:
        os.close(fd)
