"""Each qube's own cgroup subtrees, which its systemd manages as in a container.

systemd as a qube's init needs cgroup trees of its own. The host has systemd's hybrid layout (a
`name=systemd` v1 hierarchy and a cgroup2 one at `unified`); each qube gets one subtree in each,
joined by its pid 1 before a cgroup namespace is made there, so that the qube sees its subtrees as
the roots of the same layout at its /sys/fs/cgroup. The subtrees are made empty before the qube
boots and removed once its last process has gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import time
from pathlib import Path

from qubesim.errors import QubesimError
from qubesim.layout import Layout

ROOT = Path("/sys/fs/cgroup")
# The hierarchies a qube's systemd uses, by their directory under /sys/fs/cgroup.
HIERARCHIES = ("systemd", "unified")
EMPTY_TIMEOUT_SECONDS = 10


def of_host(layout: Layout) -> str:
    """The subtree of every qube of the host, the same in each hierarchy; hosts under different
    homes never share one."""
    return f"qubesim/{hashlib.sha256(str(layout.home).encode()).hexdigest()[:12]}"


def of_qube(layout: Layout, name: str) -> str:
    """The qube's subtree."""
    return f"{of_host(layout)}/{name}"


def prepare(subtree: str) -> None:
    """Empty subtrees for a qube about to boot (a previous boot's are removed first)."""
    missing = [name for name in HIERARCHIES if not (ROOT / name / "cgroup.procs").exists()]
    if missing:
        raise QubesimError(
            "qubes boot systemd, which needs systemd's hybrid cgroup layout on this machine"
            f" (a name=systemd hierarchy at {ROOT}/systemd and cgroup2 at {ROOT}/unified)"
        )
    remove(subtree)
    for name in HIERARCHIES:
        (ROOT / name / subtree).mkdir(parents=True)


def join(subtree: str) -> None:
    """Move the calling process into the qube's subtrees."""
    for name in HIERARCHIES:
        (ROOT / name / subtree / "cgroup.procs").write_text(f"{os.getpid()}\n")


def remove(subtree: str) -> None:
    """Remove the subtrees once every process in them has exited (they go with the qube's pid 1)."""
    deadline = time.monotonic() + EMPTY_TIMEOUT_SECONDS
    for name in HIERARCHIES:
        path = ROOT / name / subtree
        while path.exists():
            try:
                _remove_tree(path)
            except OSError as error:  # EBUSY: processes still exiting
                if time.monotonic() > deadline:
                    message = f"the qube's cgroup {path} is still in use: {error}"
                    raise QubesimError(message) from None
                time.sleep(0.05)


def kill_all(subtree: str) -> None:
    """Kill every process left in subtree and remove it: whatever a qube of a host left running
    (its monitor gone) goes with the host."""
    for name in HIERARCHIES:
        for procs in (ROOT / name / subtree).rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                for pid in procs.read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
    remove(subtree)


def _remove_tree(path: Path) -> None:
    directories = [entry for entry in path.rglob("*") if entry.is_dir()]
    for directory in sorted(directories, key=lambda entry: len(entry.parts), reverse=True):
        directory.rmdir()
    path.rmdir()
