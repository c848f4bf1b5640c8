"""The world and the host refuse to start on loopback ports that another program holds.

The world's servers (sshd on 10022 and 10023, git daemon on 9418) and sys-net's updates proxy
(8082) listen on fixed ports of 127.0.0.1. Each test runs in a network namespace of its own, with
hosts under its own QUBESIM_HOME: the machine's ports (other simulated hosts' worlds and sys-nets,
this host's world) are neither seen nor touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qubesim import world

Run = Callable[..., subprocess.CompletedProcess[str]]
LISTENER = (
    "import socket, sys\n"
    "server = socket.socket()\n"
    "server.bind(('127.0.0.1', int(sys.argv[1])))\n"
    "server.listen()\n"
    "print('listening', flush=True)\n"
    "sys.stdin.read()\n"
)


@pytest.fixture
def namespace() -> Iterator[list[str]]:
    """The command prefix that runs a program in a network namespace with only loopback, up."""
    holder = subprocess.Popen(
        ["unshare", "--net", "--", "sh", "-c", "ip link set lo up && echo up && exec sleep 3600"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline() == "up\n"
    yield ["nsenter", f"--net=/proc/{holder.pid}/ns/net", "--"]
    holder.kill()
    holder.wait()


@pytest.fixture
def qubesim(namespace: list[str]) -> Run:
    """`qubesim ARGS` in the namespace, for the host at `home`."""

    def run(home: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
        environment = {**os.environ, "QUBESIM_HOME": str(home)}
        return subprocess.run(
            [*namespace, "qubesim", *arguments],
            env=environment,
            capture_output=True,
            text=True,
            timeout=300,
        )

    return run


class Listener:
    """A program of the test's holding a port of the namespace's loopback."""

    def __init__(self, namespace: list[str], port: int) -> None:
        self.process = subprocess.Popen(
            [*namespace, sys.executable, "-c", LISTENER, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline() == "listening\n"
        # nsenter runs the program in its own place: the pid is the listener's.
        name = Path(f"/proc/{self.process.pid}/comm").read_text().strip()
        self.holder = f"{name} (pid {self.process.pid})"

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture
def homes(tmp_path: Path, qubesim: Run) -> Iterator[Callable[[str], Path]]:
    """Fresh QUBESIM_HOMEs; whatever was made or started in them is stopped and removed."""
    made: list[Path] = []

    def make(name: str) -> Path:
        made.append(tmp_path / name)
        return tmp_path / name

    yield make
    for home in made:
        qubesim(home, "world", "down")
        if home.exists():
            qubesim(home, "destroy")


def test_world_up_refuses_a_port_another_program_holds_and_starts_once_it_is_free(
    namespace: list[str], qubesim: Run, homes: Callable[[str], Path]
) -> None:
    home = homes("world")
    for port in (world.SSH_PORT, world.UPLOAD_PORT, world.GIT_PORT):
        listener = Listener(namespace, port)
        try:
            refused = qubesim(home, "world", "up")
        finally:
            listener.close()
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert f"port {port} on 127.0.0.1" in refused.stderr
        assert f"is held by {listener.holder}" in refused.stderr
        # Refused before anything was made or started.
        assert not (home / "world").exists()
    started = qubesim(home, "world", "up")
    assert started.returncode == 0, started.stderr
    sshd = (home / "world" / "sshd.pid").read_text()
    again = qubesim(home, "world", "up")
    assert again.returncode == 0, again.stderr
    assert (home / "world" / "sshd.pid").read_text() == sshd


def test_a_second_world_on_the_same_loopback_is_refused_until_the_first_is_down(
    qubesim: Run, homes: Callable[[str], Path]
) -> None:
    first, second = homes("first"), homes("second")
    assert qubesim(first, "world", "up").returncode == 0
    sshd = int((first / "world" / "sshd.pid").read_text().split()[0])
    refused = qubesim(second, "world", "up")
    assert refused.returncode == 1
    assert f"port {world.SSH_PORT} on 127.0.0.1" in refused.stderr
    assert f"is held by sshd (pid {sshd})" in refused.stderr
    assert qubesim(first, "world", "down").returncode == 0
    started = qubesim(second, "world", "up")
    assert started.returncode == 0, started.stderr


def wait_listening(namespace: list[str], port: int) -> None:
    probe = (
        "import socket, sys, time\n"
        "deadline = time.monotonic() + 60\n"
        "while time.monotonic() < deadline:\n"
        "    try:\n"
        "        socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1).close()\n"
        "        sys.exit(0)\n"
        "    except OSError:\n"
        "        time.sleep(0.1)\n"
        "sys.exit(1)\n"
    )
    subprocess.run([*namespace, sys.executable, "-c", probe, str(port)], check=True)


def test_init_refuses_the_updates_proxy_port_unless_its_own_sys_net_holds_it(
    namespace: list[str], qubesim: Run, homes: Callable[[str], Path]
) -> None:
    home, other = homes("host"), homes("other")
    listener = Listener(namespace, 8082)
    try:
        refused = qubesim(home, "init")
    finally:
        listener.close()
    assert refused.returncode == 1
    assert (
        f"port 8082 on 127.0.0.1, which sys-net's updates proxy needs, is held by {listener.holder}"
        in refused.stderr
    )
    assert not home.exists()
    created = qubesim(home, "init")
    assert created.returncode == 0, created.stderr
    # This host's own sys-net holds it now: init stays idempotent; another host is refused.
    started = qubesim(home, "dom0", "--", "qvm-start", "sys-net")
    assert started.returncode == 0, started.stderr
    wait_listening(namespace, 8082)
    again = qubesim(home, "init")
    assert again.returncode == 0, again.stderr
    refused = qubesim(other, "init")
    assert refused.returncode == 1
    assert "is held by tinyproxy (pid " in refused.stderr
    assert not other.exists()
