"""dom0: the host's root seen through a mount namespace in which /etc has a layer of its own.

A small holder process keeps that namespace alive between commands, so that dom0's files (policies,
qvm tool state) and the template mounts outlive any one `qubesim dom0` call, as they would in Qubes.
Everything that mounts (templates, qubes) runs inside this namespace; `enter` re-executes a command
there when it is not already.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

from qubesim import daemon, linux
from qubesim.errors import QubesimError
from qubesim.layout import Layout

HOLDER = "dom0"
# Directories every dom0 has, created in dom0's /etc layer.
DOM0_ETC_DIRS = ("qubes/policy.d", "qubes-rpc/policy", "qubes/rpc-config")


def _etc_layer(layout: Layout) -> tuple[Path, Path]:
    return layout.dom0 / "etc-upper", layout.dom0 / "etc-work"


def holder_pid(layout: Layout) -> int | None:
    """The pid of the live dom0 holder, or None when there is none (never started, or rebooted)."""
    return daemon.running_singleton(layout, HOLDER)


def ensure_holder(layout: Layout) -> int:
    # Never made anew here: a command still running while `qubesim destroy` removes the host
    # must fail, not leave a half host behind.
    if not layout.home.is_dir():
        raise QubesimError(f"no simulated Qubes host at {layout.home}: run 'qubesim init' first")
    upper, work = _etc_layer(layout)
    upper.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    layout.dom0_home.mkdir(mode=0o700, parents=True, exist_ok=True)
    return daemon.ensure_singleton(layout, HOLDER, "qubesim.dom0")


def _mount_namespace(pid: int | str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino
    except OSError:
        return None


def _ancestors() -> set[int]:
    """This process and those it descends from."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return pids


def end_commands(layout: Layout) -> None:
    """Kill every process still running in dom0 (what `qubesim dom0` started, and the tools
    those run), as a host's shutdown ends them; the caller and its ancestors are spared."""
    holder = holder_pid(layout)
    namespace = _mount_namespace(holder) if holder is not None else None
    if namespace is None:
        return
    spared = _ancestors() | {holder}
    pids = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    for pid in pids:
        if pid not in spared and _mount_namespace(pid) == namespace:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def in_dom0(pid: int) -> bool:
    ours = _mount_namespace("self")
    return ours is not None and ours == _mount_namespace(pid)


# The collection's example environments on the simulator's template: Ansible's inventory in
# qubesim's dom0 unless the caller chose one, so that `ansible-playbook site.yml` from a checkout
# runs against the simulated host (on a real dom0, ansible.cfg's inventory applies).
SIMULATED_INVENTORY = Path(__file__).resolve().parents[1] / "inventory/qubesim/build_infra.yml"


def dom0_environment(layout: Layout) -> dict[str, str]:
    path = os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    environment = {
        **os.environ,
        "QUBESIM_HOME": str(layout.home),
        "HOME": str(layout.dom0_home),
        "PATH": f"{layout.dom0_bin}:{path}",
    }
    if "ANSIBLE_INVENTORY" not in environment and SIMULATED_INVENTORY.exists():
        environment["ANSIBLE_INVENTORY"] = str(SIMULATED_INVENTORY)
    return environment


def enter(layout: Layout, argv: list[str]) -> None:
    """Run argv in dom0, replacing this process (keeps its stdio, working directory, exit code)."""
    pid = ensure_holder(layout)
    environment = dom0_environment(layout)
    if in_dom0(pid):
        os.execvpe(argv[0], argv, environment)
    nsenter = ["nsenter", f"--target={pid}", "--mount", f"--wd={os.getcwd()}", "--"]
    os.execvpe("nsenter", nsenter + argv, environment)


def ensure_in_dom0(layout: Layout) -> None:
    """Re-execute the current command inside dom0 unless it already runs there."""
    pid = ensure_holder(layout)
    if not in_dom0(pid):
        enter(layout, [sys.executable, *sys.orig_argv[1:]])


def _hold(ready_fd: int) -> None:
    """The holder process: make the namespace, mount dom0's /etc layer, then wait forever."""
    from qubesim.layout import current

    layout = current()
    try:
        linux.unshare(linux.CLONE_NEWNS)
        linux.mount("none", "/", None, linux.MS_REC | linux.MS_PRIVATE)
        upper, work = _etc_layer(layout)
        linux.mount(
            "overlay", "/etc", "overlay", 0, f"lowerdir=/etc,upperdir={upper},workdir={work}"
        )
        for directory in DOM0_ETC_DIRS:
            os.makedirs(f"/etc/{directory}", exist_ok=True)
    except OSError as error:
        daemon.notify(ready_fd, str(error))
        sys.exit(1)
    daemon.notify_ready(ready_fd)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        signal.pause()


if __name__ == "__main__":
    _hold(int(sys.argv[1]))
