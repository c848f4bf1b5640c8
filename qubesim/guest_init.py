"""A qube's first process: assembles the qube's root, then plays init until the qube shuts down.

It runs as pid 1 of the qube's pid namespace and makes the qube's mount, UTS, IPC and (when the qube
has no network) network namespaces. The root follows Qubes' persistence rules: a template's root is
its persistent overlay; an AppVM's is a fresh layer over its template's; /rw is the private volume,
with /home and (in AppVMs) /usr/local on it. After pivot_root the host's files are out of reach.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from qubesim import daemon, linux

# Capabilities a qube's root does not get: they would reach through the namespaces to the host
# (mounting its disks, loading modules, setting its clock).
# Name (as setpriv spells it) -> number from <linux/capability.h>.
DROPPED_CAPABILITIES = {
    "sys_module": 16,
    "sys_rawio": 17,
    "sys_admin": 21,
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

SHUTDOWN_GRACE_SECONDS = 10
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

# The package managers' proxy settings of a qube with updates-proxy-setup (qubes-core-agent-linux,
# network/update-proxy-configs): everything goes to the forwarder on the qube's own loopback.
UPDATES_PROXY = "http://127.0.0.1:8082/"
APT_PROXY_FILE = "/etc/apt/apt.conf.d/01qubes-proxy"
DNF_CONFIG = "/etc/dnf/dnf.conf"
QUBES_BLOCK = ("### QUBES BEGIN ###", "### QUBES END ###")


def enabled_services(qubesdb: dict[str, str]) -> list[str]:
    """The defaults of the qube's type, then each well-formed /qubes-service/NAME = 0|1."""
    enabled = set(DEFAULT_SERVICES.get(qubesdb.get("/qubes-vm-type", ""), _COMMON_SERVICES))
    for key, value in qubesdb.items():
        name = key.removeprefix(SERVICE_PREFIX)
        if key.startswith(SERVICE_PREFIX) and _SERVICE_NAME.fullmatch(name) and value in "01":
            (enabled.add if value == "1" else enabled.discard)(name)
    return sorted(enabled)


def dropped_capabilities(isolated_network: bool) -> dict[str, int]:
    dropped = dict(DROPPED_CAPABILITIES)
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
    _mount_qrexec(spec, root)
    _write_identity(spec, root)
    _pivot(root)
    _make_runtime_directories()
    linux.drop_bounding_capabilities(list(dropped_capabilities(spec.isolated_network).values()))


def _make_runtime_directories() -> None:
    """What systemd-tmpfiles does at boot for /run: the `d` entries of tmpfiles.d (the packages'
    own runtime directories, such as split-GPG's), with their mode, owner and group."""
    entries: dict[str, list[str]] = {}
    for folder in ("/usr/lib/tmpfiles.d", "/etc/tmpfiles.d"):  # /etc overrides by file name
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(folder)):
                if name.endswith(".conf"):
                    entries[name] = Path(folder, name).read_text(errors="replace").splitlines()
    for lines in entries.values():
        for line in lines:
            fields = line.split()
            if len(fields) >= 5 and fields[0] == "d" and fields[1].startswith("/run/"):
                _make_directory(*fields[1:5])


def _make_directory(path: str, mode: str, owner: str, group: str) -> None:
    with contextlib.suppress(OSError, KeyError, ValueError):
        os.makedirs(path, exist_ok=True)
        os.chmod(path, int(mode, 8) if mode != "-" else 0o755)
        uid = pwd.getpwnam(owner).pw_uid if owner != "-" else 0
        gid = grp.getgrnam(group).gr_gid if group != "-" else 0
        os.chown(path, uid, gid)


def _service_enabled(name: str) -> bool:
    return Path("/run/qubes-service", name).exists()


def _start_daemon(name: str, argv: list[str]) -> None:
    """A service the qube's init keeps running, its output in /var/log/qubes/NAME.log."""
    os.makedirs("/var/log/qubes", exist_ok=True)
    with open(f"/var/log/qubes/{name}.log", "ab") as log, contextlib.suppress(OSError):
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/")


def _write_proxy_settings(use_proxy: bool) -> None:
    """apt's and dnf's proxy, set or cleared as update-proxy-configs does at every start."""
    if os.path.isdir(os.path.dirname(APT_PROXY_FILE)):
        if use_proxy:
            Path(APT_PROXY_FILE).write_text(
                "# Written at every start of the qube: the updates proxy, over qrexec.\n"
                f'Acquire::http::Proxy "{UPDATES_PROXY}";\nAcquire::tor::proxy "{UPDATES_PROXY}";\n'
            )
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(APT_PROXY_FILE)
    if Path(DNF_CONFIG).exists():
        begin, end = QUBES_BLOCK
        text = Path(DNF_CONFIG).read_text()
        head, _, rest = text.partition(f"{begin}\n")
        tail = rest.partition(f"{end}\n")[2] if rest else ""
        entry = f"proxy={UPDATES_PROXY}\n" if use_proxy else ""
        Path(DNF_CONFIG).write_text(f"{head}{begin}\n{entry}{end}\n{tail}")


def _start_updates_proxy() -> None:
    """The updates proxy in the qube that serves it (tinyproxy), or the settings and forwarder
    that send a template's downloads to it (vm-systemd/qubes-updates-proxy.service,
    qubes-updates-proxy-forwarder.socket and their conditions)."""
    serves = _service_enabled("qubes-updates-proxy")
    uses = _service_enabled("updates-proxy-setup") or _service_enabled("yum-proxy-setup")
    _write_proxy_settings(uses)
    if serves:
        _start_daemon(
            "qubes-updates-proxy",
            ["/usr/bin/tinyproxy", "-d", "-c", "/etc/tinyproxy/tinyproxy-updates.conf"],
        )
    elif uses:
        forwarder = "/usr/lib/qubes/qubes-updates-proxy-forwarder"
        _start_daemon("qubes-updates-proxy-forwarder", [forwarder])


def _run_rc_local() -> None:
    script = "/rw/config/rc.local"
    if not os.access(script, os.X_OK):
        return
    os.makedirs("/var/log/qubes", exist_ok=True)
    environment = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
    }
    with open("/var/log/qubes/rc.local.log", "ab") as log:
        subprocess.run(
            [script], stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=environment, cwd="/"
        )


def _detach_from_host_log() -> None:
    """Pid 1's stdio is the host's log file: keep it out of the qube's reach (/proc/1/fd)."""
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


class _Shutdown(Exception):
    pass


def _request_shutdown(_signum: int, _frame: object) -> None:
    raise _Shutdown


def _reap_all() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _reap_until_shutdown() -> None:
    """Reap every orphan of the qube, as init does. SIGCHLD is blocked and waited for, so that none
    is missed between two waits; SIGTERM still interrupts the wait (shutdown)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    while True:
        _reap_all()
        signal.sigtimedwait({signal.SIGCHLD}, 60)


def _stop_everything() -> None:
    """Terminate every process of the qube, then kill what is left after the grace period."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(-1, signum)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                time.sleep(0.05)


def run(spec: BootSpec, ready_fd: int) -> None:
    """Become the qube; report `ready` (or the error) on ready_fd. Never returns."""
    signal.signal(signal.SIGTERM, _request_shutdown)
    try:
        boot(spec)
        _start_updates_proxy()
        _run_rc_local()
    except _Shutdown:
        os._exit(0)
    except (OSError, subprocess.SubprocessError) as error:
        daemon.notify(ready_fd, f"cannot start {spec.name}: {error}")
        os._exit(1)
    daemon.notify_ready(ready_fd)
    _detach_from_host_log()
    try:
        _reap_until_shutdown()
    except _Shutdown:
        _stop_everything()
    sys.stdout.flush()
    os._exit(0)
