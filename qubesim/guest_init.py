"""A qube's first process: assembles the qube's root, then becomes the distribution's systemd.

It runs as pid 1 of the qube's pid namespace and makes the qube's mount, UTS, IPC and (when the qube
has no network) network namespaces. The root follows Qubes' persistence rules: a template's root is
its persistent overlay; an AppVM's is a fresh layer over its template's last committed root; /rw is
the private volume, with /home and (in AppVMs) /usr/local on it. What qubes-sysinit does before any
unit starts (qubesdb's values, /run/qubes-service/NAME for each enabled service) is done here, then
systemd boots the qube as an AppVM boots, with the qube's own name=systemd cgroup subtree. After
pivot_root the host's files are out of reach.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from qubesim import cgroup, daemon, linux

# Capabilities a qube's root does not get: they would reach through the namespaces to the host
# (raw devices, loading modules, setting its clock).
# Name (as setpriv spells it) -> number from <linux/capability.h>.
DROPPED_CAPABILITIES = {
    "sys_module": 16,
    "sys_rawio": 17,
    "sys_boot": 22,
    "sys_time": 25,
    "mknod": 27,
    "mac_override": 32,
    "mac_admin": 33,
    "syslog": 34,
    "perfmon": 38,
    "bpf": 39,
}
NET_ADMIN = ("net_admin", 12)  # dropped too where the qube shares the host's network
# systemd keeps CAP_SYS_ADMIN, as in any container it boots in (it mounts, and sandboxes units in
# namespaces of their own); a qrexec call's processes do not get it.
SYS_ADMIN = ("sys_admin", 21)

SYSTEMD = "/lib/systemd/systemd"
# Written by qubesim's qubes-qrexec-agent.service once the qube is up (see guest/).
AGENT_STARTED = "run/qubes/qrexec-agent-started"
OLD_ROOT = "run/.oldroot"
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
USER_ID = 1000


@dataclass(frozen=True)
class BootSpec:
    """What the monitor tells pid 1 about the qube it is to become."""

    name: str
    klass: str
    template_root: str  # the template's root, mounted in dom0
    mountpoint: str
    private: str
    volatile: str
    qrexec_dir: str  # dom0's qrexec socket directory, mounted read-only at /run/qubesim
    isolated_network: bool
    qubesdb: dict[str, str]
    cgroup: str  # the qube's own subtree of each cgroup hierarchy (qubesim.cgroup)
    # /etc/hosts lines of the outside world's names; only a qube that holds the physical network
    # (sys-net) gets them, as only it would reach the world's name servers.
    outside_hosts: str

    @property
    def owns_root(self) -> bool:
        return self.klass in ("TemplateVM", "StandaloneVM")


# The services a qube runs unless qubesdb's /qubes-service/NAME says otherwise, by its
# /qubes-vm-type (qubes-core-agent-linux, vm-systemd/qubes-sysinit.sh).
_COMMON_SERVICES = ("meminfo-writer", "software-rendering")
_APPVM_SERVICES = ("qubes-update-check", "tracker", "evolution-data-server", *_COMMON_SERVICES)
DEFAULT_SERVICES = {
    "NetVM": (
        *("network-manager", "qubes-network", "qubes-update-check", "qubes-updates-proxy"),
        *("qubes-firewall", *_COMMON_SERVICES),
    ),
    "ProxyVM": ("qubes-network", "qubes-firewall", "qubes-update-check", *_COMMON_SERVICES),
    "AppVM": _APPVM_SERVICES,
    "TemplateVM": (*_APPVM_SERVICES, "updates-proxy-setup"),
}
_SERVICE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
SERVICE_PREFIX = "/qubes-service/"


def enabled_services(qubesdb: dict[str, str]) -> list[str]:
    """The defaults of the qube's type, then each well-formed /qubes-service/NAME = 0|1."""
    enabled = set(DEFAULT_SERVICES.get(qubesdb.get("/qubes-vm-type", ""), _COMMON_SERVICES))
    for key, value in qubesdb.items():
        name = key.removeprefix(SERVICE_PREFIX)
        if key.startswith(SERVICE_PREFIX) and _SERVICE_NAME.fullmatch(name) and value in "01":
            (enabled.add if value == "1" else enabled.discard)(name)
    return sorted(enabled)


def dropped_capabilities(isolated_network: bool, *, init: bool = False) -> dict[str, int]:
    """What a qube's processes may never have: its init (systemd) keeps CAP_SYS_ADMIN."""
    dropped = dict(DROPPED_CAPABILITIES)
    if not init:
        dropped[SYS_ADMIN[0]] = SYS_ADMIN[1]
    if not isolated_network:
        dropped[NET_ADMIN[0]] = NET_ADMIN[1]
    return dropped


def _mount_root(spec: BootSpec) -> Path:
    root = Path(spec.mountpoint)
    root.mkdir(parents=True, exist_ok=True)
    if spec.owns_root:
        linux.mount(spec.template_root, str(root), None, linux.MS_BIND)
    else:
        upper, work = Path(spec.volatile, "upper"), Path(spec.volatile, "work")
        upper.mkdir(parents=True)
        work.mkdir(parents=True)
        options = f"lowerdir={spec.template_root},upperdir={upper},workdir={work}"
        linux.mount("overlay", str(root), "overlay", 0, options)
    return root


def _populate_private(spec: BootSpec) -> None:
    """On first start, fill the private volume as Qubes does: /home from skel and, in AppVMs,
    /usr/local from the template."""
    private = Path(spec.private)
    (private / "config").mkdir(parents=True, exist_ok=True)
    home = private / "home" / "user"
    if not home.exists():
        shutil.copytree(Path(spec.template_root, "etc/skel"), home, symlinks=True)
        for path in [home, *home.rglob("*")]:
            os.lchown(path, USER_ID, USER_ID)
    usrlocal = private / "usrlocal"
    if not spec.owns_root and not usrlocal.exists():
        shutil.copytree(Path(spec.template_root, "usr/local"), usrlocal, symlinks=True)


def _bind(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    linux.mount(str(source), str(target), None, linux.MS_BIND)


def _mount_private(spec: BootSpec, root: Path) -> None:
    private = Path(spec.private)
    _bind(private, root / "rw")
    _bind(private / "home", root / "home")
    if not spec.owns_root:
        _bind(private / "usrlocal", root / "usr/local")


def _mount_kernel_filesystems(root: Path) -> None:
    nosuid_nodev = linux.MS_NOSUID | linux.MS_NODEV
    linux.mount("proc", str(root / "proc"), "proc", nosuid_nodev | linux.MS_NOEXEC)
    linux.mount(
        "sysfs", str(root / "sys"), "sysfs", nosuid_nodev | linux.MS_NOEXEC | linux.MS_RDONLY
    )
    dev = root / "dev"
    linux.mount("tmpfs", str(dev), "tmpfs", linux.MS_NOSUID, "mode=755")
    for device in DEVICES:
        (dev / device).touch()
        linux.mount(f"/dev/{device}", str(dev / device), None, linux.MS_BIND)
    (dev / "pts").mkdir()
    linux.mount(
        "devpts",
        str(dev / "pts"),
        "devpts",
        linux.MS_NOSUID | linux.MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=620",
    )
    (dev / "shm").mkdir()
    linux.mount("tmpfs", str(dev / "shm"), "tmpfs", nosuid_nodev, "mode=1777")
    for link, target in (
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, dev / link)
    linux.mount("tmpfs", str(root / "run"), "tmpfs", nosuid_nodev, "mode=755")
    linux.mount("tmpfs", str(root / "tmp"), "tmpfs", nosuid_nodev, "mode=1777")


def _mount_cgroup(spec: BootSpec, root: Path) -> None:
    """The qube's own cgroup subtrees, at the places systemd's hybrid layout has them: pid 1
    joins them and makes a cgroup namespace there, so that everything the qube runs stays inside
    and the qube's systemd finds its own cgroup at the roots."""
    cgroup.join(spec.cgroup)
    linux.unshare(linux.CLONE_NEWCGROUP)
    cgroups = root / "sys/fs/cgroup"
    linux.mount("tmpfs", str(cgroups), "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=755")
    for hierarchy in cgroup.HIERARCHIES:
        _bind(cgroup.ROOT / hierarchy / spec.cgroup, cgroups / hierarchy)


def _mount_qrexec(spec: BootSpec, root: Path) -> None:
    """The way to dom0's qrexec daemon; read-only, so that no one in the qube can replace it."""
    target = root / "run/qubesim"
    _bind(Path(spec.qrexec_dir), target)
    flags = linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV
    linux.mount("none", str(target), None, flags)


def _write_identity(spec: BootSpec, root: Path) -> None:
    socket.sethostname(spec.name)
    (root / "etc/hostname").write_text(f"{spec.name}\n")
    (root / "etc/hosts").write_text(
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{spec.name}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        + spec.outside_hosts
    )
    database = root / "run/qubesdb"
    for key, value in spec.qubesdb.items():
        path = database / key.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value)
    services = root / "run/qubes-service"
    services.mkdir()
    for service in enabled_services(spec.qubesdb):
        (services / service).touch()
    _make_qubes_run_directory(root, spec.qubesdb)


def _make_qubes_run_directory(root: Path, qubesdb: dict[str, str]) -> None:
    """/run/qubes (root:qubes 0775) with the qube's type and persistence, as qubes-sysinit.sh
    leaves them for other units."""
    directory = root / "run/qubes"
    directory.mkdir(mode=0o775)
    with contextlib.suppress(KeyError):
        os.chown(directory, 0, _group_id(root, "qubes"))
    vm_type = qubesdb.get("/qubes-vm-type", "")
    if vm_type in ("AppVM", "NetVM", "ProxyVM", "TemplateVM"):
        (directory / f"this-is-{vm_type.lower()}").touch()
    persistence = qubesdb.get("/qubes-vm-persistence", "")
    if persistence in ("full", "rw-only", "none"):
        (directory / f"persistent-{persistence}").touch()


def _group_id(root: Path, name: str) -> int:
    for line in (root / "etc/group").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name and len(fields) > 2 and fields[2].isdigit():
            return int(fields[2])
    raise KeyError(name)


def _pivot(root: Path) -> None:
    os.chdir(root)
    (root / OLD_ROOT).mkdir(parents=True)
    subprocess.run(["pivot_root", ".", OLD_ROOT], check=True)
    os.chdir("/")
    linux.umount(f"/{OLD_ROOT}", linux.MNT_DETACH)
    os.rmdir(f"/{OLD_ROOT}")


def boot(spec: BootSpec) -> None:
    namespaces = linux.CLONE_NEWNS | linux.CLONE_NEWUTS | linux.CLONE_NEWIPC
    if spec.isolated_network:
        namespaces |= linux.CLONE_NEWNET
    linux.unshare(namespaces)
    linux.mount("none", "/", None, linux.MS_REC | linux.MS_PRIVATE)
    if spec.isolated_network:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    root = _mount_root(spec)
    _populate_private(spec)
    _mount_private(spec, root)
    _mount_kernel_filesystems(root)
    _mount_cgroup(spec, root)
    _mount_qrexec(spec, root)
    _write_identity(spec, root)
    _pivot(root)
    dropped = dropped_capabilities(spec.isolated_network, init=True)
    linux.drop_bounding_capabilities(list(dropped.values()))


def run(spec: BootSpec, ready_fd: int) -> None:
    """Become the qube: assemble it, then exec systemd. A failure is told on ready_fd; success
    closes it (close-on-exec), and the monitor then waits for the qube's agent. Never returns."""
    try:
        boot(spec)
    except (OSError, subprocess.SubprocessError) as error:
        daemon.notify(ready_fd, f"cannot start {spec.name}: {error}")
        os._exit(1)
    # pid 1's stdio is the host's log file: keep it out of the qube's reach (/proc/1/fd).
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0,) if os.environ.get("QUBESIM_DEBUG_BOOT") else (0, 1, 2):
        os.dup2(null, fd)
    environment = {"container": "qubesim", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    if os.environ.get("QUBESIM_DEBUG_BOOT"):
        environment |= {"SYSTEMD_LOG_TARGET": "console", "SYSTEMD_LOG_LEVEL": "debug"}
    try:
        os.execve(SYSTEMD, [SYSTEMD], environment)
    except OSError as error:
        daemon.notify(ready_fd, f"cannot start {spec.name}: {SYSTEMD}: {error}")
        os._exit(1)
