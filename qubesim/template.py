"""Template roots: this machine's root with a persistent layer of the template's own.

A template's root is an overlay (lower: the host's `/`, upper: the template's layer), mounted once
in dom0 and shared: the running template uses it as its root, and every AppVM based on it stacks
its own throw-away layer on top of it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from qubesim import linux
from qubesim.errors import QubesimError
from qubesim.layout import Layout

# Top-level directories that make up an operating system; anything else at the top of the host's
# root (data, checkouts) is the host's own and is removed from templates.
SYSTEM_DIRECTORIES = frozenset(
    {"bin", "boot", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "run", "sbin", "sys"}
    | {"tmp", "usr", "var"}
)
# Standard directories whose host content (homes, site-local software) is the host's own: the
# template has them, empty.
EMPTIED_DIRECTORIES = ("home", "root", "mnt", "media", "opt", "srv", "usr/local")

# What a distribution's /usr/local holds when nothing is installed there (Qubes copies the
# template's /usr/local into an AppVM's private volume on its first start).
USR_LOCAL_DIRECTORIES = ("bin", "etc", "games", "include", "lib", "sbin", "share", "src")

USER = "user"
USER_ID = 1000

# Guest tools installed into every template: destination -> (file in qubesim/guest, mode).
GUEST_FILES = {
    "usr/bin/qubesdb-read": ("qubesdb-read", 0o755),
    "usr/lib/qubes/qubesim-exec": ("qubesim-exec", 0o755),
    "usr/bin/qrexec-client-vm": ("qrexec-client-vm", 0o755),
    "usr/bin/qubes-gpg-client": ("split-gpg", 0o755),
    "usr/bin/qubes-gpg-client-wrapper": ("split-gpg", 0o755),
    "etc/qubes-rpc/qubes.Gpg": ("split-gpg", 0o755),
    "etc/qubes-rpc/qubes.GpgImportKey": ("split-gpg", 0o755),
    "etc/profile.d/qubes-gpg.sh": ("qubes-gpg.sh", 0o644),
    "usr/lib/tmpfiles.d/qubes-gpg-split.conf": ("qubes-gpg-split.tmpfiles", 0o644),
    "etc/qubes-rpc/qubes.VMShell": ("qubes.VMShell", 0o755),
    "etc/qubes-rpc/qubes.VMRootShell": ("qubes.VMShell", 0o755),
    "usr/lib/qubes/qubesim-tcp-service": ("qubesim-tcp-service", 0o755),
    "usr/lib/qubes/update-proxy-configs": ("update-proxy-configs", 0o755),
    "usr/lib/qubes/init/misc-post.sh": ("misc-post.sh", 0o755),
    "etc/tinyproxy/tinyproxy-updates.conf": ("tinyproxy-updates.conf", 0o644),
    "etc/qubes/rpc-config/qubes.UpdatesProxy": ("rpc-config-updates-proxy", 0o644),
    "etc/qubes-rpc/qubes.WaitForSession": ("qubes.WaitForSession", 0o755),
    # qubesim's screen: zenity's questions, seen and answered from dom0 (qubesim/screen.py).
    "usr/bin/zenity": ("zenity", 0o755),
    "usr/lib/tmpfiles.d/qubesim-screen.conf": ("qubesim-screen.tmpfiles", 0o644),
}
# The Qubes units a template carries (qubes-core-agent-linux vm-systemd/, qubes-core-qrexec
# systemd/), each enabled as its preset (vm-systemd/75-qubes-vm.preset) enables it: the
# [Install] target that wants it.
GUEST_UNITS = {
    "qubes-qrexec-agent.service": "multi-user.target",
    "qubes-misc-post.service": "multi-user.target",
    "qubes-updates-proxy.service": "multi-user.target",
    "qubes-updates-proxy-forwarder.socket": "multi-user.target",
    "qubes-updates-proxy-forwarder@.service": None,
}
UNIT_DIRECTORY = "usr/lib/systemd/system"
ENABLED_UNITS = "etc/systemd/system"
# The user's instance: qubesim's marker that it has started (see guest/), for qrexec calls.
GUEST_USER_UNITS = {"qubesim-user-started.service": "default.target"}
USER_UNIT_DIRECTORY = "usr/lib/systemd/user"
ENABLED_USER_UNITS = "etc/systemd/user"
# The host's own enabled units are its services (sshd, a database, nginx...): a Qubes template
# runs none of them, and in qubesim every qube with a netvm shares the host's loopback, where two
# qubes' copies would fight for one port. The template keeps the host's timers only, less those
# Qubes' preset disables.
KEPT_HOST_UNITS = ("timers.target.wants",)
QUBES_DISABLED_UNITS = frozenset({"apt-daily.timer", "apt-daily-upgrade.timer"})
# `user`'s own systemd instance runs from boot, as it does in a Qubes AppVM with its session.
LINGER = "var/lib/systemd/linger/user"

# Guest files that came with a release: core-agent-linux ships qubes.VMRootShell's rpc-config,
# which runs the service as root whatever user the caller got, from 4.3 (commit 1c538af2).
RELEASE_GUEST_FILES = {
    "4.3": {"etc/qubes/rpc-config/qubes.VMRootShell": ("rpc-config-force-root", 0o644)},
}
# The package that gives `user` root without a password; Qubes' minimal templates go without it.
PASSWORDLESS_ROOT = "qubes-core-agent-passwordless-root"
PASSWORDLESS_ROOT_FILES = {"etc/sudoers.d/qubes": ("sudoers", 0o440)}
# Groups that a distribution's sudoers lets administer the system: Qubes' packaging puts `user`
# only in `qubes`, so a template's `user` is in none of these.
ADMIN_GROUPS = ("sudo", "wheel", "admin")
# Guest services that qrexec reaches as TCP services (symlinks to /dev/tcp/HOST/PORT).
GUEST_LINKS = {
    # The updates qube's proxy: its tinyproxy, on its own loopback.
    "etc/qubes-rpc/qubes.UpdatesProxy": "/dev/tcp/127.0.0.1/8082",
}
# The Qubes packages whose files qubesim installs, registered with dpkg as installed, as they
# are in Qubes' templates (so a package module sees them): name -> their files among GUEST_FILES.
QUBES_PACKAGES = {
    "qubes-gpg-split": (
        "usr/bin/qubes-gpg-client",
        "usr/bin/qubes-gpg-client-wrapper",
        "etc/qubes-rpc/qubes.Gpg",
        "etc/qubes-rpc/qubes.GpgImportKey",
        "etc/profile.d/qubes-gpg.sh",
        "usr/lib/tmpfiles.d/qubes-gpg-split.conf",
    ),
    PASSWORDLESS_ROOT: tuple(PASSWORDLESS_ROOT_FILES),
}
QUBES_PACKAGE_VERSION = "2.0+qubesim1"
DPKG_STATUS = "var/lib/dpkg/status"
REQUIRED_HOST_PROGRAMS = (
    "/bin/bash",
    "/usr/bin/sudo",
    "/usr/bin/setpriv",
    "/usr/bin/python3",
    "/usr/bin/gpg",
)


def host_template_name() -> str:
    """debian-12 on Debian 12: the name Qubes gives a template of this distribution."""
    fields = {}
    for line in Path("/etc/os-release").read_text().splitlines():
        key, _, value = line.partition("=")
        fields[key] = value.strip('"')
    version = fields.get("VERSION_ID", "").split(".")[0]
    return f"{fields.get('ID', 'linux')}-{version}" if version else fields.get("ID", "linux")


def check_host_programs() -> None:
    missing = [program for program in REQUIRED_HOST_PROGRAMS if not os.access(program, os.X_OK)]
    if missing:
        raise QubesimError(
            "templates are made from this machine's root, which lacks "
            + ", ".join(missing)
            + " (install sudo, util-linux, python3 and gnupg)"
        )


def _layers(layout: Layout, name: str) -> tuple[Path, Path]:
    return layout.root_upper(name) / "upper", layout.root_upper(name) / "work"


def _empty(upper: Path, relative: str) -> None:
    """An opaque directory in the upper layer: the host's content below it is not seen."""
    target = upper / relative
    target.mkdir(mode=0o700 if relative == "root" else 0o755, parents=True, exist_ok=True)
    os.setxattr(target, "trusted.overlay.opaque", b"y")


def _remove(upper: Path, relative: str) -> None:
    """A whiteout in the upper layer: the host's entry is not seen at all."""
    target = upper / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(0, 0))


def create_root(layout: Layout, name: str) -> None:
    """Make a template's persistent layer, hiding the host's own files and qubesim's; idempotent."""
    upper, work = _layers(layout, name)
    if upper.exists():
        return
    fresh = upper.with_name("upper.new")
    fresh.mkdir(parents=True, exist_ok=True)
    for entry in Path("/").iterdir():
        if entry.name not in SYSTEM_DIRECTORIES and entry.name not in EMPTIED_DIRECTORIES:
            _remove(fresh, entry.name)
    for relative in EMPTIED_DIRECTORIES:
        _empty(fresh, relative)
    if layout.home.parts[1] in SYSTEM_DIRECTORIES:
        _remove(fresh, str(layout.home.relative_to("/")))
    for relative in _host_enabled_units():
        _remove(fresh, relative)
    work.mkdir(parents=True, exist_ok=True)
    fresh.rename(upper)


def _host_enabled_units() -> list[str]:
    """The host's enablement and alias links that a template does not keep (KEPT_HOST_UNITS)."""
    hidden = []
    for link in Path("/", ENABLED_UNITS).rglob("*"):
        if not link.is_symlink():
            continue
        wants = link.parent.name
        if wants in KEPT_HOST_UNITS and link.name not in QUBES_DISABLED_UNITS:
            continue
        hidden.append(str(link.relative_to("/")))
    return hidden


def mount(layout: Layout, name: str) -> Path:
    """Mount a template's root in dom0 (once) and return where."""
    target = layout.template_mount(name)
    if str(target) not in linux.mount_points():
        upper, work = _layers(layout, name)
        target.mkdir(parents=True, exist_ok=True)
        linux.mount(
            "overlay", str(target), "overlay", 0, f"lowerdir=/,upperdir={upper},workdir={work}"
        )
    return target


def unmount(layout: Layout, name: str) -> None:
    """Unmount a template's root and its snapshots from dom0."""
    for target in [layout.template_mount(name), *_snapshot_mounts(layout, name).values()]:
        _unmount(target)


def _unmount(target: Path) -> None:
    if str(target) in linux.mount_points():
        linux.umount(str(target), linux.MNT_DETACH)
    with contextlib.suppress(FileNotFoundError):
        target.rmdir()


# -- snapshots: the template's root as of its last shutdown, which AppVMs start from ----------
# Qubes commits a template's root volume when the template stops, and an AppVM's root is a
# snapshot of the committed volume taken at the AppVM's start (qubes-core-admin,
# qubes/storage/lvm.py and file-reflink.py: stop() of a save_on_stop volume, start() of a
# snap_on_start one). Here each commit is a generation: a copy of the template's layer, mounted
# read-only over the host's root; AppVMs stack their throw-away layer on the newest one.


def _snapshot_directory(layout: Layout, name: str) -> Path:
    return layout.root_upper(name) / "snapshots"


def committed_generation(layout: Layout, name: str) -> str | None:
    with contextlib.suppress(FileNotFoundError):
        return (layout.root_upper(name) / "committed").read_text().strip() or None
    return None


def commit(layout: Layout, name: str) -> None:
    """Record a halted template's root as the one AppVMs started from now on see."""
    upper, _ = _layers(layout, name)
    generation = str(int(committed_generation(layout, name) or 0) + 1)
    target = _snapshot_directory(layout, name) / generation
    shutil.rmtree(target, ignore_errors=True)  # what an interrupted commit left
    (target / "work").mkdir(parents=True)
    # cp keeps what makes an overlay layer: whiteouts (device nodes) and opaque directories
    # (trusted.* extended attributes).
    subprocess.run(["cp", "-a", "--", str(upper), str(target / "upper")], check=True)
    pointer = layout.root_upper(name) / "committed.new"
    pointer.write_text(f"{generation}\n")
    os.replace(pointer, layout.root_upper(name) / "committed")


def snapshot_mount(layout: Layout, name: str) -> Path:
    """Mount (once) the template's newest committed root in dom0 and return where."""
    generation = committed_generation(layout, name)
    if generation is None:  # a template made before snapshots existed: commit it as it is
        commit(layout, name)
        generation = committed_generation(layout, name)
    layers = _snapshot_directory(layout, name) / str(generation)
    target = layout.home / "mnt" / f"{name}@{generation}"
    if str(target) not in linux.mount_points():
        target.mkdir(parents=True, exist_ok=True)
        options = f"lowerdir=/,upperdir={layers / 'upper'},workdir={layers / 'work'}"
        linux.mount("overlay", str(target), "overlay", linux.MS_RDONLY, options)
    return target


def _snapshot_mounts(layout: Layout, name: str) -> dict[str, Path]:
    """The template's snapshot generations (committed or not yet removed) -> their mount points."""
    with contextlib.suppress(FileNotFoundError):
        return {
            entry.name: layout.home / "mnt" / f"{name}@{entry.name}"
            for entry in _snapshot_directory(layout, name).iterdir()
        }
    return {}


def discard_snapshots(layout: Layout, name: str, in_use: set[Path]) -> None:
    """Remove the template's old generations that no running AppVM has as its root's base."""
    current = committed_generation(layout, name)
    for generation, mountpoint in _snapshot_mounts(layout, name).items():
        if generation != current and mountpoint not in in_use:
            _unmount(mountpoint)
            shutil.rmtree(_snapshot_directory(layout, name) / generation, ignore_errors=True)


def guest_files(release: str, minimal: bool) -> dict[str, tuple[str, int]]:
    """What qubesim installs in a template of `release`; a minimal one lacks passwordless root."""
    files = {**GUEST_FILES, **RELEASE_GUEST_FILES.get(release, {})}
    return files if minimal else {**files, **PASSWORDLESS_ROOT_FILES}


def qubes_packages(minimal: bool) -> dict[str, tuple[str, ...]]:
    """The Qubes packages a template carries, among those whose files qubesim installs."""
    return {
        package: files
        for package, files in QUBES_PACKAGES.items()
        if not (minimal and package == PASSWORDLESS_ROOT)
    }


def install_guest_files(root: Path, release: str, minimal: bool = False) -> None:
    """Write the guest tools and the `user` account into a mounted template root."""
    guest = resources.files("qubesim") / "guest"
    for destination, (source, mode) in guest_files(release, minimal).items():
        _write_file(root / destination, (guest / source).read_bytes(), mode)
    for destination, target in GUEST_LINKS.items():
        _link(root / destination, target)
    for directory in USR_LOCAL_DIRECTORIES:
        (root / "usr/local" / directory).mkdir(mode=0o755, exist_ok=True)
    _install_units(root)
    _ensure_user(root)
    _register_packages(root, qubes_packages(minimal))


def _install_units(root: Path) -> None:
    """Qubes' units, enabled as a package's install enables them, and `user`'s lingering."""
    guest = resources.files("qubesim") / "guest"
    kinds = (
        (GUEST_UNITS, UNIT_DIRECTORY, ENABLED_UNITS),
        (GUEST_USER_UNITS, USER_UNIT_DIRECTORY, ENABLED_USER_UNITS),
    )
    for units, directory, enabled in kinds:
        for unit, wanted_by in units.items():
            _write_file(root / directory / unit, (guest / unit).read_bytes(), 0o644)
            if wanted_by is not None:
                _link(root / enabled / f"{wanted_by}.wants" / unit, f"/{directory}/{unit}")
    linger = root / LINGER
    linger.parent.mkdir(parents=True, exist_ok=True)
    linger.touch()


def _write_file(path: Path, content: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_bytes() != content:
        path.write_bytes(content)
    os.chmod(path, mode)
    os.chown(path, 0, 0)


def _link(path: Path, target: str) -> None:
    if os.path.islink(path) and os.readlink(path) == target:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    path.symlink_to(target)


def _register_packages(root: Path, packages: dict[str, tuple[str, ...]]) -> None:
    """Record Qubes packages in the template's dpkg database, once (on a dpkg system)."""
    status = root / DPKG_STATUS
    if not status.exists():
        return
    text = status.read_text()
    registered = {
        line.removeprefix("Package: ") for line in text.splitlines() if line.startswith("Package: ")
    }
    separator = "" if text.endswith("\n\n") or not text else "\n"
    for package, files in packages.items():
        if package in registered:
            continue
        (root / f"var/lib/dpkg/info/{package}.list").write_text(
            "".join(f"/{path}\n" for path in files)
        )
        with status.open("a") as database:
            database.write(
                f"{separator}Package: {package}\nStatus: install ok installed\nPriority: optional\n"
                f"Section: admin\nMaintainer: qubesim\nArchitecture: all\n"
                f"Version: {QUBES_PACKAGE_VERSION}\n"
                f"Description: {package} as the simulated Qubes host provides it\n\n"
            )
        separator = ""


def _rewrite_entries(path: Path, dropped: Callable[[list[str]], bool], new_entry: str) -> set[str]:
    """Replace the entries that `dropped` selects in an /etc account file; return their names."""
    if not path.exists():
        return set()
    lines = path.read_text().splitlines()
    kept = [line for line in lines if not dropped(line.split(":"))]
    removed = {line.split(":")[0] for line in lines} - {line.split(":")[0] for line in kept}
    kept.append(new_entry)
    if kept != lines:
        # Writing in place keeps the file's owner and mode (shadow is root:shadow 0640).
        with open(path, "w") as file:
            file.write("\n".join(kept) + "\n")
    return removed


def _ensure_user(root: Path) -> None:
    """Give the template the Qubes user: `user`, uid 1000, replacing a host account with that id."""
    etc = root / "etc"

    def holds_id(fields: list[str]) -> bool:
        return fields[0] == USER or (len(fields) > 2 and fields[2] == str(USER_ID))

    users = _rewrite_entries(
        etc / "passwd", holds_id, f"{USER}:x:{USER_ID}:{USER_ID}:{USER}:/home/{USER}:/bin/bash"
    )
    groups = _rewrite_entries(etc / "group", holds_id, f"{USER}:x:{USER_ID}:")
    _leave_admin_groups(etc / "group")
    _ensure_qubes_group(etc / "group")
    _rewrite_entries(
        etc / "shadow", lambda f: f[0] in users | {USER}, f"{USER}:!:19000:0:99999:7:::"
    )
    _rewrite_entries(etc / "gshadow", lambda f: f[0] in groups | {USER}, f"{USER}:!::")


def _leave_admin_groups(path: Path) -> None:
    """Take `user` out of ADMIN_GROUPS (a host account named `user` may have been in one)."""
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        fields = line.split(":")
        if len(fields) == 4 and fields[0] in ADMIN_GROUPS:
            members = [member for member in fields[3].split(",") if member and member != USER]
            line = ":".join([*fields[:3], ",".join(members)])
        kept.append(line)
    if kept != lines:
        with open(path, "w") as file:
            file.write("\n".join(kept) + "\n")


def _ensure_qubes_group(path: Path) -> None:
    """The `qubes` group that Qubes templates have, with `user` in it (split-GPG's windows are
    root:qubes)."""
    entries = [line.split(":") for line in path.read_text().splitlines()]
    if any(fields[0] == "qubes" for fields in entries):
        return
    taken = {int(fields[2]) for fields in entries if len(fields) > 2 and fields[2].isdigit()}
    gid = next(number for number in range(98, 1000) if number not in taken)
    with open(path, "a") as file:
        file.write(f"qubes:x:{gid}:{USER}\n")


def prepare(
    layout: Layout, name: str, release: str, minimal: bool = False, copy_of: str | None = None
) -> None:
    """Create (or refresh the guest tools of) a template of `release` from this machine's root,
    or a StandaloneVM's root from a copy of its template's committed root (`copy_of`)."""
    check_host_programs()
    if copy_of is not None:  # the guest tools come with the copy, as they are in the template
        if not layout.root_upper(name).joinpath("upper").exists():
            _copy_committed_root(layout, copy_of, name)
        mount(layout, name)
        return
    create_root(layout, name)
    install_guest_files(mount(layout, name), release, minimal)


def minimal_template_name(name: str) -> str:
    """debian-12-minimal: the name Qubes gives the minimal template of a distribution."""
    return f"{name}-minimal"


def _copy_committed_root(layout: Layout, template: str, name: str) -> None:
    generation = committed_generation(layout, template)
    source = (
        _snapshot_directory(layout, template) / generation / "upper"
        if generation is not None
        else _layers(layout, template)[0]
    )
    upper, work = _layers(layout, name)
    upper.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", "--", str(source), str(upper)], check=True)
    work.mkdir(exist_ok=True)
