"""A logs repository as the logs qube meets it on GitHub: a bare git repository behind a real sshd
on dom0's loopback (qubes with a netvm share the host's network in qubesim), reached with a deploy
key, its history signed by a logs key made for the test. Tests only."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"


@dataclass
class LogsServer:
    directory: Path
    bare: Path
    port: int
    deploy_key: str
    known_hosts_line: str
    gnupg: Path
    logs_key: str
    public_key: str
    secret_key: str

    @property
    def url(self) -> str:
        return f"ssh://root@127.0.0.1:{self.port}{self.bare}"

    def git(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        """git on the bare repository, with the logs key's keyring (to verify signatures)."""
        return subprocess.run(
            ["git", "--git-dir", str(self.bare), *arguments],
            env={
                "GNUPGHOME": str(self.gnupg),
                "PATH": "/usr/bin:/bin",
                "HOME": str(self.directory),
            },
            capture_output=True,
            text=True,
            check=False,
        )

    def role_variables(self) -> dict[str, object]:
        return {
            "build_logs_repo_url": self.url,
            "build_logs_key_fingerprint": self.logs_key,
            "build_logs_public_key": self.public_key,
            "build_logs_secret_key": self.secret_key,
            "build_logs_deploy_key": self.deploy_key,
            "build_logs_known_hosts": [self.known_hosts_line],
        }


def _run(*argv: str, env: dict[str, str] | None = None, input: str | None = None) -> str:
    return subprocess.run(
        argv, env=env, input=input, capture_output=True, text=True, check=True, timeout=120
    ).stdout


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _logs_key(gnupg: Path) -> tuple[str, str, str]:
    gnupg.mkdir(mode=0o700)
    environment = {"GNUPGHOME": str(gnupg), "PATH": "/usr/bin:/bin"}
    uid = "Build logs (test) <logs@example.org>"
    _run("gpg", "--batch", "--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", "never",
         env=environment)  # fmt: skip
    listing = _run("gpg", "--with-colons", "--list-secret-keys", uid, env=environment)
    fingerprint = next(line.split(":")[9] for line in listing.splitlines() if line[:4] == "fpr:")
    public = _run("gpg", "--armor", "--export", fingerprint, env=environment)
    secret = _run("gpg", "--batch", "--armor", "--export-secret-keys", fingerprint, env=environment)
    return fingerprint, public, secret


def _seed(server_dir: Path, bare: Path, gnupg: Path, fingerprint: str) -> None:
    """The repository's first commit, signed by the logs key, as the real one has."""
    environment = {"GNUPGHOME": str(gnupg), "PATH": "/usr/bin:/bin", "HOME": str(server_dir)}
    _run("git", "init", "--quiet", "--bare", "--initial-branch=master", str(bare), env=environment)
    seed = server_dir / "seed"
    _run("git", "init", "--quiet", "--initial-branch=master", str(seed), env=environment)
    for name, value in (
        ("user.name", "Build logs"),
        ("user.email", "logs@example.org"),
        ("user.signingkey", fingerprint),
        ("commit.gpgsign", "true"),
    ):
        _run("git", "-C", str(seed), "config", name, value, env=environment)
    (seed / "README.md").write_text("Build logs\n")
    _run("git", "-C", str(seed), "add", "README.md", env=environment)
    _run("git", "-C", str(seed), "commit", "--quiet", "-m", "Build logs", env=environment)
    _run("git", "-C", str(seed), "push", "--quiet", str(bare), "master", env=environment)


def _sshd_config(directory: Path, port: int) -> Path:
    config = directory / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {directory}/host_key\n"
        f"AuthorizedKeysFile {directory}/authorized_keys\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\n"
        f"PidFile {directory}/sshd.pid\n"
    )
    return config


def _wait_for(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sshd exited {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.1)
    raise RuntimeError("sshd did not listen")


class Sshd:
    """The server process; stop() and start() again simulate an outage."""

    def __init__(self, config: Path, port: int) -> None:
        self.config = config
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)])
        _wait_for(self.port, self.process)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)
            self.process = None


@contextlib.contextmanager
def logs_server(directory: Path) -> Iterator[tuple[LogsServer, Sshd]]:
    directory.chmod(0o755)
    port = _free_port()
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / "host_key"))
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / "deploy"))
    (directory / "authorized_keys").write_text((directory / "deploy.pub").read_text())
    fingerprint, public, secret = _logs_key(directory / "gnupg")
    bare = directory / "build-logs.git"
    _seed(directory, bare, directory / "gnupg", fingerprint)
    host_key = " ".join((directory / "host_key.pub").read_text().split()[:2])
    sshd = Sshd(_sshd_config(directory, port), port)
    sshd.start()
    try:
        yield (
            LogsServer(
                directory=directory,
                bare=bare,
                port=port,
                deploy_key=(directory / "deploy").read_text(),
                known_hosts_line=f"[127.0.0.1]:{port} {host_key}",
                gnupg=directory / "gnupg",
                logs_key=fingerprint,
                public_key=public,
                secret_key=secret,
            ),
            sshd,
        )
    finally:
        sshd.stop()
