"""Template roots: this machine's root with a persistent layer of the template's own.

A template's root is an overlay (lower: the host's `/`, upper: the template's layer), mounted once
in dom0 and shared: the running template uses it as its root, and every AppVM based on it stacks
its own throw-away layer on top of it.
"""

from __future__ import annotations

import contextlib
import os
import stat
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
    "usr/lib/qubes/qubes-updates-proxy-forwarder": ("qubes-updates-proxy-forwarder", 0o755),
    "etc/tinyproxy/tinyproxy-updates.conf": ("tinyproxy-updates.conf", 0o644),
    "etc/qubes/rpc-config/qubes.UpdatesProxy": ("rpc-config-updates-proxy", 0o644),
}
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
    work.mkdir(parents=True, exist_ok=True)
    fresh.rename(upper)


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
    target = layout.template_mount(name)
    if str(target) in linux.mount_points():
        linux.umount(str(target), linux.MNT_DETACH)
    with contextlib.suppress(FileNotFoundError):
        target.rmdir()


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
        path = root / destination
        path.parent.mkdir(parents=True, exist_ok=True)
        content = (guest / source).read_bytes()
        if not path.exists() or path.read_bytes() != content:
            path.write_bytes(content)
        os.chmod(path, mode)
        os.chown(path, 0, 0)
    for destination, target in GUEST_LINKS.items():
        path = root / destination
        if os.path.islink(path) and os.readlink(path) == target:
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        path.symlink_to(target)
    for directory in USR_LOCAL_DIRECTORIES:
        (root / "usr/local" / directory).mkdir(mode=0o755, exist_ok=True)
    _ensure_user(root)
    _register_packages(root, qubes_packages(minimal))


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


def prepare(layout: Layout, name: str, release: str, minimal: bool = False) -> None:
    """Create (or refresh the guest tools of) a template of `release` from this machine's root."""
    check_host_programs()
    create_root(layout, name)
    install_guest_files(mount(layout, name), release, minimal)


def minimal_template_name(name: str) -> str:
    """debian-12-minimal: the name Qubes gives the minimal template of a distribution."""
    return f"{name}-minimal"
