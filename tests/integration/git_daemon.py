"""Git repositories served read-only by a real `git daemon` on dom0's loopback, for qubes to clone
(qubes with a netvm share the host's network in qubesim). Tests only."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

GIT_ENVIRONMENT = {
    "PATH": "/usr/bin:/bin",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.org",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.org",
}


def _git(*arguments: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", *arguments],
        cwd=cwd,
        env={**GIT_ENVIRONMENT, "HOME": str(cwd)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


class GitDaemon:
    def __init__(self, base: Path) -> None:
        self.base = base
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])

    def url(self, name: str) -> str:
        return f"git://127.0.0.1:{self.port}/{name}.git"

    def publish(self, name: str, files: Path, branch: str = "main") -> str:
        """A repository `name` whose one commit holds the tree `files`; returns the commit."""
        work = self.base / f"{name}.work"
        shutil.copytree(files, work, symlinks=True)
        _git("init", "--quiet", f"--initial-branch={branch}", ".", cwd=work)
        _git("add", "--all", cwd=work)
        _git("commit", "--quiet", "-m", f"{name} for tests", cwd=work)
        _git("clone", "--quiet", "--bare", str(work), str(self.base / f"{name}.git"), cwd=self.base)
        return _git("rev-parse", "HEAD", cwd=work)


@contextlib.contextmanager
def git_daemon(base: Path) -> Iterator[GitDaemon]:
    daemon = GitDaemon(base)
    process = subprocess.Popen(
        ["git", "daemon", "--export-all", "--reuseaddr", f"--base-path={base}",
         "--listen=127.0.0.1", f"--port={daemon.port}", str(base)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", daemon.port), 1),
            ):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("git daemon did not start")
            time.sleep(0.1)
        yield daemon
    finally:
        process.terminate()
        process.wait(30)
