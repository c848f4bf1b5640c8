"""The outside world the build infrastructure talks to, on this machine's loopback.

In Qubes the logs qube pushes to GitHub over ssh and the build qubes clone qubes-builder and its
release configurations from GitHub. Here, `qubesim world up` provides the same with real servers
(qubes with a netvm share the host's network, so they reach 127.0.0.1):

* the logs repository: a bare git repository behind a real sshd, written with a deploy key, its
  history signed by a logs key made for this world;
* read-only repositories behind `git daemon`: a stand-in for qubes-builder (its `auto-build`
  streams a build's output to the logs qube, signs the artifact over split-GPG and uploads both),
  whose commit carries a tag signed by a maintainer key made for this world, as qubes-builder's
  releases do, and the release configurations, written like the real ones;
* the upload server: the same sshd on a second port, where an upload key may only put files into
  the upload area over SFTP. Its name resolves only in the qubes that hold the physical network
  (sys-net): qubesim adds the world's `hosts` entries to their /etc/hosts at every start, so build
  qubes reach it only through the ssh proxy in the net qube.

Everything lives under $QUBESIM_HOME/world; `variables.json` there holds the roles' variables
that point at it (`ansible-playbook -e @...`), and `remote_hosts.json` the upload server as an
entry of build_infra_remote_hosts, which the simulated example inventory reads from there (the
infrastructure's description is the inventory's alone: the preflight refuses build_infra_*
variables given with -e). Keys and repositories are made once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from qubesim import ports
from qubesim.errors import QubesimError
from qubesim.layout import Layout

SSH_PORT = 10022
UPLOAD_PORT = 10023
UPLOAD_HOST = "upload.qubesim.invalid"
GIT_PORT = 9418
LOOPBACK = "127.0.0.1"
# /etc/hosts entries of the world's names, for the qubes that hold the physical network: the
# outside world's name servers answer whether or not its servers are up.
HOSTS = f"{LOOPBACK}\t{UPLOAD_HOST}\n"
LOGS_KEY_UID = "Build logs (qubesim world) <logs@qubesim.invalid>"
MAINTAINER_KEY_UID = "qubes-builder maintainer (qubesim world) <builder@qubesim.invalid>"
BUILDER_TAG = "v4.2.0"
TOOLS = ("/usr/sbin/sshd", "/usr/bin/ssh-keygen", "/usr/bin/git", "/usr/bin/gpg")
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "qubesim world",
    "GIT_AUTHOR_EMAIL": "world@qubesim.invalid",
    "GIT_COMMITTER_NAME": "qubesim world",
    "GIT_COMMITTER_EMAIL": "world@qubesim.invalid",
}


@dataclass(frozen=True)
class World:
    layout: Layout

    @property
    def directory(self) -> Path:
        return self.layout.home / "world"

    @property
    def gnupg(self) -> Path:
        return self.directory / "gnupg"

    @property
    def logs_repository(self) -> Path:
        return self.directory / "git" / "build-logs.git"

    @property
    def uploads(self) -> Path:
        """What build qubes uploaded (the upload server's area)."""
        return self.directory / "uploads"

    @property
    def variables_file(self) -> Path:
        return self.directory / "variables.json"

    @property
    def remote_hosts_file(self) -> Path:
        """The upload server as build_infra_remote_hosts: read by inventory/qubesim's group_vars."""
        return self.directory / "remote_hosts.json"

    def environment(self) -> dict[str, str]:
        return {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.directory),
            "GNUPGHOME": str(self.gnupg),
            "GIT_CONFIG_NOSYSTEM": "1",
            **GIT_IDENTITY,
        }

    def run(self, *argv: str, cwd: Path | None = None) -> str:
        result = subprocess.run(
            argv,
            cwd=cwd,
            env=self.environment(),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if result.returncode != 0:
            raise QubesimError(f"world: {' '.join(argv[:3])} failed: {result.stderr.strip()}")
        return result.stdout

    def variables(self) -> dict[str, object]:
        return json.loads(self.variables_file.read_text())


# -- making the world (once) -----------------------------------------------------------------------
def _key(world: World, uid: str) -> str:
    """A new signing key in the world's keyring; its fingerprint."""
    world.gnupg.mkdir(mode=0o700, exist_ok=True)
    world.run("gpg", "--batch", "--passphrase", "", "--quick-gen-key", uid, "ed25519",
              "sign", "never")  # fmt: skip
    listing = world.run("gpg", "--with-colons", "--list-secret-keys", uid)
    return next(line.split(":")[9] for line in listing.splitlines() if line[:4] == "fpr:")


def _logs_key(world: World) -> tuple[str, str, str]:
    fingerprint = _key(world, LOGS_KEY_UID)
    public = world.run("gpg", "--armor", "--export", fingerprint)
    secret = world.run("gpg", "--batch", "--armor", "--export-secret-keys", fingerprint)
    return fingerprint, public, secret


def _repository(
    world: World, name: str, files: Path, branch: str = "master", signing_key: str | None = None
) -> str:
    """A bare repository `name` whose one commit on `branch` (signed with signing_key, if one is
    given) holds `files`; returns the commit."""
    work = world.directory / "work" / name
    shutil.copytree(files, work, symlinks=True)
    world.run("git", "init", "--quiet", f"--initial-branch={branch}", ".", cwd=work)
    world.run("git", "add", "--all", cwd=work)
    signing = ["-c", f"user.signingkey={signing_key}", "-c", "commit.gpgsign=true"]
    world.run("git", *(signing if signing_key else []), "commit", "--quiet", "-m", name, cwd=work)
    bare = world.directory / "git" / f"{name}.git"
    world.run("git", "clone", "--quiet", "--bare", str(work), str(bare))
    return world.run("git", "rev-parse", "HEAD", cwd=work).strip()


def _signed_tag(world: World, name: str, tag: str, signing_key: str) -> None:
    """A tag on the tip of repository `name`, signed as qubes-builder's maintainers sign theirs
    (its scripts/verify-git-tag checks such a tag on the commit a checkout is at)."""
    bare = world.directory / "git" / f"{name}.git"
    world.run("git", "--git-dir", str(bare), "tag", "--sign", "--local-user", signing_key,
              "-m", f"{name} {tag}", tag, "HEAD")  # fmt: skip


def _release_configs(world: World) -> Path:
    """A release configuration as the build machines' are written: what to build with `?=`, so
    that builder-github's per-build settings win; where the repositories are; the settings of
    the build qube (its signing key among them) from ~/builder-github.conf."""
    configs = world.directory / "files" / "release-configs"
    (configs / "R4.2").mkdir(parents=True)
    # What each build environment builds: a push of another component starts nothing there.
    for name, components in (
        ("host", "vmm-xen core-libvirt core-admin core-admin-client gui-daemon linux-utils"),
        ("kernel", "linux-kernel"),
    ):
        (configs / "R4.2" / f"qubes-os-r4.2-{name}.conf").write_text(
            f"# Qubes OS R4.2, the {name} packages.\n"
            "RELEASE := 4.2\n"
            "BRANCH ?= release4.2\n"
            "GIT_BASEURL ?= https://github.com\n"
            "GIT_PREFIX ?= QubesOS/qubes-\n"
            "DIST_DOM0 ?= fc37\n"
            "DISTS_VM ?= fc37 bookworm\n"
            f"COMPONENTS ?= {components} \\\n"
            "    builder-rpm builder-debian builder-github\n"
            "BUILDER_PLUGINS ?= builder-rpm builder-debian builder-github\n"
            "LINUX_REPO_BASEDIR ?= $(SRC_DIR)/linux-yum/current-release\n"
            f"UPLOAD_HOST := {UPLOAD_HOST}\n"
            "include $(HOME)/builder-github.conf\n"
        )
    return configs


def _builder_files() -> Path:
    return Path(str(resources.files("qubesim") / "world_builder"))


def _ssh_keys(world: World) -> None:
    ssh = world.directory / "ssh"
    ssh.mkdir(mode=0o700)
    for name in ("host_key", "deploy_key", "upload_key"):
        world.run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / name))
    (ssh / "authorized_keys").write_text((ssh / "deploy_key.pub").read_text())
    (ssh / "upload_authorized_keys").write_text((ssh / "upload_key.pub").read_text())
    world.uploads.mkdir(mode=0o755)
    # The upload port takes the upload key only, and only for SFTP (what scp speaks) in the area.
    (ssh / "sshd_config").write_text(
        f"Port {SSH_PORT}\nPort {UPLOAD_PORT}\nListenAddress {LOOPBACK}\nHostKey {ssh}/host_key\n"
        f"AuthorizedKeysFile {ssh}/authorized_keys\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\n"
        f"PidFile {world.directory}/sshd.pid\nSubsystem sftp internal-sftp\n"
        f"Match LocalPort {UPLOAD_PORT}\n"
        f"  AuthorizedKeysFile {ssh}/upload_authorized_keys\n"
        f"  ForceCommand internal-sftp -d {world.uploads}\n"
        "  AllowTcpForwarding no\n  X11Forwarding no\n  PermitTTY no\n"
    )


def _upload_host(world: World, host_key: str) -> None:
    """The upload server as the remote host of the simulated inventory (public data only)."""
    hosts = {UPLOAD_HOST: {"user": "root", "host_key": host_key, "port": UPLOAD_PORT}}
    world.remote_hosts_file.write_text(json.dumps(hosts, indent=2) + "\n")


def make(world: World) -> None:
    """Keys, the logs repository and the served repositories; the variables pointing at them."""
    if world.variables_file.exists():
        return
    shutil.rmtree(world.directory, ignore_errors=True)
    world.directory.mkdir(mode=0o755, parents=True)
    (world.directory / "git").mkdir()
    _ssh_keys(world)
    fingerprint, public, secret = _logs_key(world)
    logs = world.directory / "files" / "build-logs"
    logs.mkdir(parents=True)
    (logs / "README.md").write_text("Build logs of the qubesim world\n")
    _repository(world, "build-logs", logs, signing_key=fingerprint)
    builder_commit = _repository(world, "qubes-builder", _builder_files())
    maintainer = _key(world, MAINTAINER_KEY_UID)
    _signed_tag(world, "qubes-builder", BUILDER_TAG, maintainer)
    _repository(world, "release-configs", _release_configs(world), branch="main")
    ssh = world.directory / "ssh"
    host_key = " ".join((ssh / "host_key.pub").read_text().split()[:2])
    variables = {
        "build_logs_repo_url": f"ssh://root@{LOOPBACK}:{SSH_PORT}{world.logs_repository}",
        "build_logs_key_fingerprint": fingerprint,
        "build_logs_public_key": public,
        "build_logs_secret_key": secret,
        "build_logs_deploy_key": (ssh / "deploy_key").read_text(),
        "build_logs_known_hosts": [f"[{LOOPBACK}]:{SSH_PORT} {host_key}"],
        "build_vm_builder_repo_url": f"git://{LOOPBACK}:{GIT_PORT}/qubes-builder.git",
        "build_vm_builder_commit": builder_commit,
        "build_vm_required_keys": [maintainer],
        "build_vm_trusted_keys": {maintainer: world.run("gpg", "--armor", "--export", maintainer)},
        "build_vm_upload_ssh_key": (ssh / "upload_key").read_text(),
        "keys_vm_generate_key": True,
        "webhooks_secret": os.urandom(32).hex(),
    }
    _upload_host(world, host_key)
    # Written last: its presence means the world is made.
    fd = os.open(world.variables_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(variables, out, indent=2)


# -- its servers -----------------------------------------------------------------------------------
def _pid(path: Path, program: str) -> int | None:
    """The pid recorded in path if that process is still `program` (its kernel name)."""
    try:
        pid = int(path.read_text().split()[0])
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError, IndexError):
        return None
    return pid if name == program else None


@dataclass(frozen=True)
class Server:
    """One of the world's servers: its program (kernel name), pid file and ports."""

    program: str
    ports: tuple[int, ...]
    label: str

    def pid_file(self, world: World) -> Path:
        return world.directory / f"{self.program}.pid"


SSHD = Server("sshd", (SSH_PORT, UPLOAD_PORT), "the world's sshd")
GIT_DAEMON = Server("git-daemon", (GIT_PORT,), "the world's git daemon")
START_SECONDS = 30


def running(world: World, server: Server) -> int | None:
    """The pid of this world's server if it runs and holds its ports (a recorded pid that another
    program has since taken does not)."""
    pid = _pid(server.pid_file(world), server.program)
    if pid is None:
        return None
    held = all(pid in {holder.pid for holder in ports.holders(port)} for port in server.ports)
    return pid if held else None


def _require_ports(world: World, server: Server) -> None:
    """Refuse to start `server` on ports another program (or another world) holds."""
    if running(world, server) is not None:
        return
    for port in server.ports:
        ports.require(port, server.label, lambda holder: False)


def _wait_started(world: World, server: Server) -> None:
    deadline = time.monotonic() + START_SECONDS
    while running(world, server) is None:
        if time.monotonic() > deadline:
            listed = ", ".join(str(port) for port in server.ports)
            raise QubesimError(f"world: {server.label} does not listen on {LOOPBACK}:{listed}")
        time.sleep(0.1)


def start_sshd(world: World) -> None:
    if running(world, SSHD) is not None:
        return
    _require_ports(world, SSHD)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation folder
    world.run("/usr/sbin/sshd", "-f", str(world.directory / "ssh" / "sshd_config"))
    _wait_started(world, SSHD)


def start_git_daemon(world: World) -> None:
    if running(world, GIT_DAEMON) is not None:
        return
    _require_ports(world, GIT_DAEMON)
    git = world.directory / "git"
    world.run("git", "daemon", "--detach", "--reuseaddr", "--export-all", f"--base-path={git}",
              f"--listen={LOOPBACK}", f"--port={GIT_PORT}",
              f"--pid-file={GIT_DAEMON.pid_file(world)}", str(git))  # fmt: skip
    _wait_started(world, GIT_DAEMON)


def _stop(path: Path, program: str) -> None:
    pid = _pid(path, program)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while _pid(path, program) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    path.unlink(missing_ok=True)


def stop_sshd(world: World) -> None:
    _stop(SSHD.pid_file(world), SSHD.program)


def up(world: World) -> None:
    """Start the world (making it first); refused, before anything is made or started, while
    another program holds a port one of its servers needs. Starting it again changes nothing."""
    missing = [tool for tool in TOOLS if not os.access(tool, os.X_OK)]
    if missing:
        raise QubesimError(f"world: this machine lacks {', '.join(missing)}")
    for server in (SSHD, GIT_DAEMON):
        _require_ports(world, server)
    make(world)
    start_sshd(world)
    start_git_daemon(world)


def down(world: World) -> None:
    stop_sshd(world)
    _stop(GIT_DAEMON.pid_file(world), GIT_DAEMON.program)
