"""Who holds a port of this machine's loopback, found as qubesim's world and init find it."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from qubesim import ports


@pytest.fixture
def listening() -> Iterator[int]:
    """A port of 127.0.0.1 this test process listens on."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


def _me() -> ports.Holder:
    return ports.Holder(os.getpid(), Path("/proc/self/comm").read_text().strip())


def test_a_held_port_names_its_holder(listening: int) -> None:
    assert not ports.is_free(listening)
    assert _me() in ports.holders(listening)
    with pytest.raises(ports.PortTaken) as refused:
        ports.require(listening, "a test server", lambda holder: False)
    assert str(refused.value) == (
        f"port {listening} on 127.0.0.1, which a test server needs, is held by {_me()}"
    )


def test_a_port_held_by_our_own_server_is_accepted(listening: int) -> None:
    ports.require(listening, "a test server", lambda holder: holder.pid == os.getpid())


def test_a_port_nobody_holds_is_free() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
    assert ports.is_free(port)
    assert ports.holders(port) == []
    ports.require(port, "a test server", lambda holder: False)


def test_a_wildcard_listener_covers_loopback() -> None:
    with socket.socket() as server:
        server.bind(("0.0.0.0", 0))
        server.listen()
        port = server.getsockname()[1]
        assert not ports.is_free(port)
        assert _me() in ports.holders(port)


@pytest.mark.skipif(sys.byteorder != "little", reason="the table's words are in host order")
@pytest.mark.parametrize(
    ("table", "address"),
    [
        ("0100007F", "127.0.0.1"),
        ("00000000", "0.0.0.0"),
        ("00000000000000000000000000000000", "::"),
        ("0000000000000000FFFF00000100007F", "::ffff:127.0.0.1"),
    ],
)
def test_addresses_read_as_proc_net_tcp_prints_them(table: str, address: str) -> None:
    assert ports._address(table) == address
