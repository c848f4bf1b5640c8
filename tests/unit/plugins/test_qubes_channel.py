"""The framed channel, end to end with a real agent: bash stands in for qubes.VMShell (which is
`exec /bin/bash` reading its stdin), so everything but qrexec itself is real."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from ansible_collections.qubes_infra.build.plugins.plugin_utils import (
    qubes_agent,
    qubes_client,
    qubes_multiplexer,
    qubes_transport,
)
from ansible_collections.qubes_infra.build.plugins.plugin_utils.qubes_client import Session
from ansible_collections.qubes_infra.build.plugins.plugin_utils.qubes_transport import Transport

ODD_NAMES = [
    "plain",
    "with space",
    'quote\'s "double"',
    "dollar $HOME",
    "tick `id`",
    "new\nline",
    "ünïcödé ✓",
    "-leading-dash",
    "semi;colon&amp|pipe",
]


@pytest.fixture
def session() -> Iterator[Session]:
    transport = Transport(["bash"], timeout=30)
    yield qubes_client.stream_session(transport)
    transport.close()


def test_command_output_exit_code_and_input(session: Session) -> None:
    result = session.run("echo out; echo err >&2; exit 3")
    assert (result.rc, bytes(result.stdout), bytes(result.stderr)) == (3, b"out\n", b"err\n")
    data = os.urandom(3 * qubes_agent.CHUNK + 17)
    result = session.run("cat", stdin=data)
    assert bytes(result.stdout) == data


def test_unread_input_is_never_executed(session: Session, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    result = session.run("head -c 1 >/dev/null", stdin=f"x\ntouch {marker}\n".encode())
    assert result.rc == 0
    session.run("true")  # the channel is still in step
    assert not marker.exists()


@pytest.mark.parametrize("name", ODD_NAMES)
def test_put_and_fetch_any_file_name(session: Session, tmp_path: Path, name: str) -> None:
    data = os.urandom(100_000)
    target = tmp_path / name
    assert session.put(io.BytesIO(data), str(target)).rc == 0
    assert target.read_bytes() == data
    fetched = bytearray()
    assert session.fetch(str(target), fetched.extend).rc == 0
    assert bytes(fetched) == data
    assert sorted(os.listdir(tmp_path)) == [name]  # no temporary file left behind


def test_put_replaces_atomically_and_keeps_the_old_file_on_error(
    session: Session, tmp_path: Path
) -> None:
    target = tmp_path / "file"
    target.write_bytes(b"old")
    assert session.put(io.BytesIO(b"new"), str(target)).rc == 0
    assert target.read_bytes() == b"new"
    missing = tmp_path / "no-such-dir" / "file"
    result = session.put(io.BytesIO(b"data"), str(missing))
    assert result.rc == 1
    assert result.error == f"cannot write {missing}: No such file or directory"


def test_fetch_of_a_missing_file_names_it(session: Session, tmp_path: Path) -> None:
    result = session.fetch(str(tmp_path / "absent"), lambda _chunk: None)
    assert result.rc == 1
    assert f"{tmp_path / 'absent'}" in str(result.error)


def _ended(pid: int) -> bool:
    """Whether the process exits (or is a zombie) within a generous 10 seconds."""
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    return True


def test_timeout_kills_the_whole_command(session: Session, tmp_path: Path) -> None:
    pid_file = tmp_path / "child"
    with pytest.raises(TimeoutError):
        session.run(f"sleep 300 & echo $! > {pid_file}; wait", timeout=1)
    assert _ended(int(pid_file.read_text()))
    assert bytes(session.run("echo next").stdout) == b"next\n"


def test_handshake_failure_reports_exit_code_and_stderr() -> None:
    with pytest.raises(qubes_transport.ConnectFailure) as failure:
        Transport(["sh", "-c", "echo 'Request refused' >&2; exit 126"], 10)
    assert failure.value.returncode == 126
    assert b"Request refused" in failure.value.stderr


def test_handshake_timeout() -> None:
    with pytest.raises(qubes_transport.ConnectFailure, match="no answer within 1 seconds"):
        Transport(["sleep", "30"], timeout=1)


def test_oversized_frames_from_the_other_side_are_refused() -> None:
    reader_end, writer_end = os.pipe()
    os.write(
        writer_end, qubes_agent.HEADER.pack(qubes_agent.STDOUT, 1, qubes_agent.MAX_PAYLOAD + 1)
    )
    with pytest.raises(qubes_agent.ChannelError, match="oversized"):
        qubes_agent.Reader(reader_end).read_frame()
    os.close(reader_end)
    os.close(writer_end)


def test_exit_information_must_be_a_json_object() -> None:
    with pytest.raises(qubes_agent.ChannelError, match="malformed"):
        qubes_agent.decode_json(b"__import__('os').system('id')")
    with pytest.raises(qubes_agent.ChannelError, match="malformed"):
        qubes_agent.decode_json(b"[1, 2]")


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 200_000,
        b'{"rc": 1e999, "error": null}',
        b'{"rc": "0", "error": null}',
        b'{"rc": true, "error": null}',
        b'{"rc": 1099511627776, "error": null}',
        b'{"rc": 0, "error": 5}',
        b'{"rc": 0, "error": "\\ud800"',
        b"\xff\xfe",
    ],
    ids=[
        "nested",
        "huge-float",
        "text-rc",
        "bool-rc",
        "out-of-range",
        "error-type",
        "cut",
        "bytes",
    ],
)
def test_exit_frames_of_any_shape_are_a_channel_error(payload: bytes) -> None:
    """Whatever the qube puts in an EXIT frame ends as ChannelError, never as another exception."""
    read_end, write_end = os.pipe()
    frame = qubes_agent.HEADER.pack(qubes_agent.EXIT, 1, len(payload)) + payload
    writer = threading.Thread(target=os.write, args=(write_end, frame))
    writer.start()
    session = Session(lambda _buffers: None, qubes_agent.Reader(read_end), lambda: None)
    with pytest.raises(qubes_agent.ChannelError, match="malformed message from the qube"):
        session.run("true")
    writer.join()
    os.close(read_end)
    os.close(write_end)


def test_output_beyond_the_limit_kills_the_command(session: Session, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    with pytest.raises(qubes_client.LimitExceeded):
        session.run(f"echo $$ > {pid_file}; exec yes", output_limit=1 << 20)
    assert _ended(int(pid_file.read_text()))
    assert bytes(session.run("echo next").stdout) == b"next\n"


def test_fetch_beyond_the_limit_is_stopped(session: Session, tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(os.urandom(3 * qubes_agent.CHUNK))
    received = bytearray()
    with pytest.raises(qubes_client.LimitExceeded):
        session.fetch(str(big), received.extend, limit=qubes_agent.CHUNK)
    assert len(received) <= qubes_agent.CHUNK
    assert bytes(session.run("echo next").stdout) == b"next\n"


def _silent_after_handshake() -> list[str]:
    """A peer that answers the handshake, then never reads its input again (a hostile qube)."""
    source = qubes_transport.agent_source()
    size = len(qubes_transport.bootstrap_line(source) + source)
    return ["sh", "-c", f"head -c {size} >/dev/null; printf 'QUBES-CHANNEL 1\\n'; exec sleep 300"]


def test_a_kill_is_never_held_behind_a_blocked_writer() -> None:
    transport = Transport(_silent_after_handshake(), timeout=60)
    session = qubes_client.stream_session(transport)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        session.run("cat", stdin=b"x" * (16 << 20), timeout=1)
    assert time.monotonic() - started < 20  # well under the transport's 60 s write limit
    assert transport.process.poll() is not None  # the stream was torn down


def test_a_qube_that_stops_reading_loses_the_stream() -> None:
    transport = Transport(_silent_after_handshake(), timeout=1)
    with pytest.raises(qubes_agent.ChannelError, match="left its input unread for 1 seconds"):
        transport.send_buffers([b"x" * (16 << 20)])
    assert transport.process.poll() is not None


def test_a_garbage_handshake_is_refused_and_its_stream_killed() -> None:
    started = time.monotonic()
    with pytest.raises(qubes_transport.ConnectFailure, match="something else than the agent"):
        Transport(["sh", "-c", "echo NOT-THE-AGENT-AT-ALL; exec sleep 300"], timeout=30)
    assert time.monotonic() - started < 20


def test_a_failed_handshake_ends_within_the_timeout_even_if_the_stream_lingers() -> None:
    """The stream closes its output but does not exit: it is killed at the deadline."""
    started = time.monotonic()
    with pytest.raises(qubes_transport.ConnectFailure) as failure:
        Transport(["sh", "-c", "exec >&-; exec sleep 300"], timeout=2)
    assert failure.value.returncode is None
    assert time.monotonic() - started < 20


def test_printable_drops_terminal_escapes_and_bounds_the_text() -> None:
    shown = qubes_client.printable("\x1b]0;title\x07\x1b[2Jfake \u2603" + "x" * 1000, 50)
    assert shown == "x" * 50
    assert qubes_client.printable("\x1b[31mred\r\n", 100) == "?[31mred?\n"


def _start_multiplexer(tmp_path: Path, idle: float) -> tuple[subprocess.Popen[bytes], str]:
    path = str(tmp_path / "control" / "socket")
    spec = {"command": ["bash"], "socket": path, "idle": idle, "timeout": 30}
    read_end, write_end = os.pipe()
    process = subprocess.Popen(qubes_multiplexer.command(spec, write_end), pass_fds=(write_end,))
    os.close(write_end)
    with os.fdopen(read_end, "rb") as notify:
        assert json.loads(notify.readline()) == {"ok": True}
    return process, path


def _client(path: str) -> Session:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    return qubes_client.socket_session(client)


def test_multiplexer_serves_concurrent_clients_over_one_agent(tmp_path: Path) -> None:
    process, path = _start_multiplexer(tmp_path, idle=30)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    results: dict[int, bytes] = {}

    def work(number: int) -> None:
        session = _client(path)
        outputs = [bytes(session.run(f"echo {number}-{i}; echo $PPID").stdout) for i in range(5)]
        results[number] = b"".join(outputs)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    agents = set()
    for number, output in results.items():
        lines = output.decode().split()
        assert lines[0::2] == [f"{number}-{i}" for i in range(5)]
        agents.update(lines[1::2])
    assert len(agents) == 1  # every command ran under the same agent
    process.terminate()
    process.wait()


def test_multiplexer_exits_when_idle(tmp_path: Path) -> None:
    process, path = _start_multiplexer(tmp_path, idle=1)
    assert bytes(_client(path).run("echo hi").stdout) == b"hi\n"
    assert process.wait(timeout=30) == 0
    assert not Path(path).exists()


def test_the_agent_writes_whole_frames_through_short_writes() -> None:
    """A gathering write may take only part of a frame (a signal during a write to a full pipe):
    the rest follows, or the stream would lose its framing."""
    written = bytearray()

    def short_writev(buffers: Sequence[qubes_agent.Buffer]) -> int:
        taken = b"".join(bytes(buffer) for buffer in buffers)[:1000]
        written.extend(taken)
        return len(taken)

    idle_end, _unused = os.pipe()
    agent = qubes_agent.Agent(qubes_agent.Reader(idle_end), short_writev)
    payload = os.urandom(5000)
    agent.writer.send(qubes_agent.STDOUT, 7, payload)
    read_end, write_end = os.pipe()
    os.write(write_end, written)
    assert qubes_agent.Reader(read_end).read_frame() == (qubes_agent.STDOUT, 7, payload)
    for fd in (idle_end, _unused, read_end, write_end):
        os.close(fd)


def test_large_frames_cross_the_channel_whole_and_in_order(session: Session) -> None:
    """Frames as large as the protocol allows, through pipes that hold one of them, in both
    directions."""
    data = os.urandom(5 * qubes_agent.MAX_PAYLOAD + 3)
    result = session.run("cat", stdin=data)
    assert (result.rc, bytes(result.stdout)) == (0, data)
