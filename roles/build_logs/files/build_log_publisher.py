# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Publish a stored build log: a signed commit in the logs repository, a push, and only then
the call that tells the build qube's keys qube that the log arrived.

Used by the qubesbuilder.BuildLog receiver in the logs qube. The repository's remote is trusted
only as far as its tip carries a good signature by the logs key: anything else is refused before
our commits are put on top of it. A push that fails keeps the commit; the next log pushes both.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import subprocess
from collections.abc import Iterator
from typing import Any

CONFIG = "/usr/local/etc/qubes-infra-build/build-logs.json"
DEFAULTS: dict[str, Any] = {
    "directory": "~/QubesIncomingBuildLog",
    "branch": "master",
    "logs_key": "",
    "max_line_bytes": 16384,
    "max_log_bytes": 4 << 30,
    "compress_above_bytes": 10 << 20,
    "git_timeout": 300,
    "notify": ["qrexec-client-vm", "dom0", "qubesbuilder.LogReceived+{source}"],
    "notify_timeout": 120,
}
ERROR_SHOWN = 2000
LOCK_NAME = "qubes-infra-build-publish.lock"


class PublishError(Exception):
    """The log is stored but could not be published (or the keys qube was not told)."""


def load_config() -> dict[str, Any]:
    """The settings the build_logs role wrote; BUILD_LOGS_CONFIG names another file (tests)."""
    config = dict(DEFAULTS)
    with (
        contextlib.suppress(FileNotFoundError),
        open(os.environ.get("BUILD_LOGS_CONFIG", CONFIG), encoding="utf-8") as source,
    ):
        config.update(json.load(source))
    config["directory"] = os.path.expanduser(config["directory"])
    return config


def _printable(text: str) -> str:
    return re.sub(r"[^\x20-\x7e\n]", "?", text)[-ERROR_SHOWN:].strip()


def _run_git(repository: str, timeout: float, *arguments: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["git", "-C", repository, *arguments],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise PublishError(f"git {arguments[0]} took more than {timeout} seconds") from None


def _git(repository: str, timeout: float, *arguments: str) -> subprocess.CompletedProcess[str]:
    result = _run_git(repository, timeout, *arguments)
    if result.returncode != 0:
        raise PublishError(f"git {arguments[0]} failed: {_printable(result.stderr)}")
    return result


@contextlib.contextmanager
def _locked(repository: str) -> Iterator[None]:
    """One publication at a time: builds of several environments may end together."""
    with open(os.path.join(repository, ".git", LOCK_NAME), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def signer(status: str) -> str | None:
    """The primary key fingerprint of a good, valid signature in `git verify-commit --raw`'s
    GnuPG status lines, or None."""
    words = [line.split() for line in status.splitlines() if line.startswith("[GNUPG:] ")]
    kinds = {w[1] for w in words if len(w) > 1}
    if "GOODSIG" not in kinds or kinds & {"BADSIG", "EXPSIG", "EXPKEYSIG", "REVKEYSIG", "ERRSIG"}:
        return None
    for word in words:
        if len(word) >= 12 and word[1] == "VALIDSIG":
            return word[11].upper()
    return None


def _require_trusted_tip(repository: str, tip: str, logs_key: str, timeout: float) -> None:
    verified = _run_git(repository, timeout, "verify-commit", "--raw", tip)
    if not logs_key or signer(verified.stderr) != logs_key.upper():
        raise PublishError(
            f"the logs repository's remote tip {tip[:12]} is not signed by the logs key"
            f" {logs_key or '(none configured)'}: refusing to build on it"
        )


def _commit(repository: str, log_path: str, timeout: float) -> None:
    """Commit everything not yet committed (this log, and any a failure left behind)."""
    _git(repository, timeout, "add", "--all")
    if _git(repository, timeout, "status", "--porcelain").stdout.strip():
        name = os.path.relpath(log_path, repository)
        _git(repository, timeout, "commit", "--quiet", "--gpg-sign", "-m", f"Build log {name}")


def _fetch_tip(repository: str, branch: str, timeout: float) -> str:
    _git(repository, timeout, "fetch", "--quiet", "origin", f"refs/heads/{branch}")
    return _git(repository, timeout, "rev-parse", "FETCH_HEAD^{commit}").stdout.strip()


def _rebase(repository: str, tip: str, timeout: float) -> None:
    """Our unpushed commits on top of the remote tip, signed again."""
    try:
        _git(repository, timeout, "rebase", "--quiet", "--gpg-sign", tip)
    except PublishError:
        _run_git(repository, timeout, "rebase", "--abort")
        raise


def notify(source: str, config: dict[str, Any]) -> None:
    command = [part.replace("{source}", source) for part in config["notify"]]
    timeout = float(config["notify_timeout"])
    try:
        result = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise PublishError(
            f"the log was pushed, but telling the keys qube failed: {error}"
        ) from None
    if result.returncode != 0:
        raise PublishError(
            "the log was pushed, but telling the keys qube failed"
            f" (exit {result.returncode}): {_printable(result.stderr.decode('utf-8', 'replace'))}"
        )


def publish(log_path: str, source: str, config: dict[str, Any]) -> None:
    """Commit (signed), push, then tell source's keys qube. PublishError says what failed."""
    repository, branch = config["directory"], config["branch"]
    timeout = float(config["git_timeout"])
    try:
        with _locked(repository):
            _commit(repository, log_path, timeout)
            tip = _fetch_tip(repository, branch, timeout)
            _require_trusted_tip(repository, tip, config["logs_key"], timeout)
            _rebase(repository, tip, timeout)
            _git(repository, timeout, "push", "--quiet", "origin", f"HEAD:refs/heads/{branch}")
    except OSError as error:
        raise PublishError(f"the logs repository {repository} cannot be used: {error}") from None
    notify(source, config)
