"""Ports on this machine's loopback that qubesim's servers and qubes listen on, and who holds one.

The world's servers and sys-net's updates proxy listen on fixed ports of 127.0.0.1, shared by
every program of the machine (and every other simulated host). A port held by another program
must stop a start, naming the holder: checking afterwards that "something listens" would take the
other program for our own server, and the qubes would talk to it.

A port is held when binding 127.0.0.1:PORT fails as our servers' would (SO_REUSEADDR, as sshd and
git daemon set it). The holder is found as `ss -p` finds it: the listening socket's inode in
/proc/net/tcp (or tcp6, for a wildcard that covers 127.0.0.1), then the processes with a
descriptor on it (/proc/PID/fd).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from qubesim.errors import QubesimError

LOOPBACK = "127.0.0.1"
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's st column
# Listening addresses that keep 127.0.0.1:PORT from being bound.
_COVERING = {"127.0.0.1", "0.0.0.0", "::", "::ffff:127.0.0.1", "::ffff:0.0.0.0"}
_NAMED_MAX = 3


@dataclass(frozen=True)
class Holder:
    pid: int
    name: str  # the process's kernel name (/proc/PID/comm)

    def __str__(self) -> str:
        return f"{self.name} (pid {self.pid})"


class PortTaken(QubesimError):
    pass


def is_free(port: int) -> bool:
    """Whether 127.0.0.1:PORT can be bound as a server binds it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((LOOPBACK, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def _address(hexadecimal: str) -> str:
    """An address as /proc/net/tcp{,6} prints it: 32-bit words in the machine's byte order."""
    words = [int(hexadecimal[index : index + 8], 16) for index in range(0, len(hexadecimal), 8)]
    packed = b"".join(struct.pack("=I", word) for word in words)
    family = socket.AF_INET if len(packed) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, packed)


def _listening_inodes(port: int) -> set[int]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                address, _, hex_port = fields[1].partition(":")
                if fields[3] != _LISTEN or int(hex_port, 16) != port:
                    continue
                if _address(address) in _COVERING:
                    inodes.add(int(fields[9]))
    return inodes


def _socket_owners(inodes: set[int]) -> Iterator[int]:
    links = {f"socket:[{inode}]" for inode in inodes}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(fd.path) in links:
                        yield int(entry.name)
                        break


def holders(port: int) -> list[Holder]:
    """The processes holding a listening socket that covers 127.0.0.1:PORT, lowest pid first."""
    inodes = _listening_inodes(port)
    if not inodes:
        return []
    found = []
    for pid in sorted(set(_socket_owners(inodes))):
        with contextlib.suppress(OSError):
            found.append(Holder(pid, Path(f"/proc/{pid}/comm").read_text().strip()))
    return found


def require(port: int, needed_by: str, ours: Callable[[Holder], bool]) -> None:
    """Refuse, naming the holder, unless 127.0.0.1:PORT is free or held by one of `ours`."""
    if is_free(port):
        return
    found = holders(port)
    if found and any(ours(holder) for holder in found):
        return
    named = ", ".join(str(holder) for holder in found[:_NAMED_MAX]) or "another program"
    raise PortTaken(f"port {port} on {LOOPBACK}, which {needed_by} needs, is held by {named}")


def pid_namespace(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None
