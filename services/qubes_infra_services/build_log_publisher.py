# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Publish a stored build log: a signed commit in the logs repository, a push, and only then
the call that tells the build qube's keys qube that the log arrived.

Used by the qubesbuilder.BuildLog receiver in the logs qube. The repository's remote is trusted
only as far as its tip carries a good signature by the logs key: anything else is refused before
our commits are put on top of it. Each log is a commit of its own.

What one caller (a build qube) can cost the others:
- A push that fails on the way (no network, server down, a race with another pusher) keeps the
  commits; the next log pushes them all.
- A commit the remote refuses (GitHub's file size limit, a hook) is set aside: its log is moved
  to DIRECTORY/.set-aside/<same path>, a line goes to the journal, the commit leaves the branch,
  and the other commits are pushed. The refused log's own call fails; no other waits on it.
- Disk: each caller's stored logs (DIRECTORY/<caller>/ and its set-aside logs) are kept under
  quota_bytes by removing that caller's oldest published logs from this qube (the working copy
  and, when it is a loose object, git's copy; never the commit that removes them: the logs
  repository keeps them). Another caller's logs and logs not yet published are never removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import subprocess
import syslog
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from qubes_infra_services.definitions import (
    is_qube_name,
    load_settings,
    printable,
    settings_path,
)

CONFIG = "/usr/local/etc/qubes-infra-build/build-logs.json"
DEFAULTS: dict[str, Any] = {
    "directory": "~/QubesIncomingBuildLog",
    "branch": "master",
    "logs_key": "",
    "max_line_bytes": 16384,
    "max_log_bytes": 4 << 30,
    "max_stored_bytes": 50 << 20,
    "compress_above_bytes": 10 << 20,
    "quota_bytes": 1 << 30,
    "max_streams": 4,
    "git_timeout": 300,
    "notify": ["qrexec-client-vm", "dom0", "qubesbuilder.LogReceived+{source}"],
    "notify_timeout": 120,
}
LOG_NAME = re.compile(r"log_(\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d)(?:\.(\d{1,4}))?(?:\.xz)?")
ERROR_SHOWN = 2000
LOCK_NAME = "qubes-infra-build-publish.lock"
SET_ASIDE = ".set-aside"
# A file nobody holds locked and untouched this long is a log whose receiver died before it
# committed it (the logs qube stopped): it is published with the next log.
STRAY_AGE = 60
# Repacking would need the objects of logs removed to keep within a quota.
GIT = ("git", "-c", "gc.auto=0", "-c", "maintenance.auto=false", "-C")


class PublishError(Exception):
    """The log is stored but could not be published (or the keys qube was not told)."""


def load_config() -> dict[str, Any]:
    """The settings the build_logs role wrote, in the file BUILD_LOGS_CONFIG names."""
    config = load_settings(settings_path("BUILD_LOGS_CONFIG", CONFIG), DEFAULTS)
    config["directory"] = os.path.expanduser(config["directory"])
    return config


def _tool_error(text: str) -> str:
    """Error output of a tool, whose end says most."""
    return printable(text, ERROR_SHOWN, newlines=True, last=True)


def journal(message: str) -> None:
    syslog.openlog("qubesbuilder.BuildLog", 0, syslog.LOG_USER)
    syslog.syslog(syslog.LOG_WARNING, message)


@dataclass(frozen=True)
class Git:
    repository: str
    timeout: float

    def run(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                [*GIT, self.repository, *arguments],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=self.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise PublishError(
                f"git {arguments[0]} took more than {self.timeout} seconds"
            ) from None

    def __call__(self, *arguments: str) -> str:
        result = self.run(*arguments)
        if result.returncode != 0:
            raise PublishError(f"git {arguments[0]} failed: {_tool_error(result.stderr)}")
        return result.stdout

    def paths(self, command: str, *arguments: str) -> list[str]:
        """The NUL-separated paths a git command lists."""
        return [path for path in self(command, "-z", *arguments).split("\0") if path]


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


def _require_trusted_tip(git: Git, tip: str, logs_key: str) -> None:
    verified = git.run("verify-commit", "--raw", tip)
    if not logs_key or signer(verified.stderr) != logs_key.upper():
        raise PublishError(
            f"the logs repository's remote tip {tip[:12]} is not signed by the logs key"
            f" {logs_key or '(none configured)'}: refusing to build on it"
        )


def _exclude_set_aside(repository: str) -> None:
    """Set-aside logs live in the clone's folder but are never committed."""
    exclude = os.path.join(repository, ".git", "info", "exclude")
    os.makedirs(os.path.dirname(exclude), exist_ok=True)
    line = f"/{SET_ASIDE}/"
    with open(exclude, "a+", encoding="utf-8") as patterns:
        patterns.seek(0)
        if line not in patterns.read().splitlines():
            patterns.write(f"\n{line}\n")


def _commit_one(git: Git, name: str) -> None:
    git("add", "--", name)
    if git.run("diff", "--cached", "--quiet").returncode != 0:
        git("commit", "--quiet", "--gpg-sign", "-m", f"Build log {name}")


def _idle(path: str) -> bool:
    """Not being written: untouched for STRAY_AGE seconds and not locked by a receiver."""
    try:
        if time.time() - os.lstat(path).st_mtime < STRAY_AGE:
            return False
        with open(path, "rb") as stray:
            fcntl.flock(stray, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _commit(git: Git, log_path: str) -> None:
    """A commit for this log, after one for each stray log a dead receiver left behind."""
    own = os.path.relpath(log_path, git.repository)
    for name in git.paths("ls-files", "--others", "--exclude-standard"):
        top = name.split("/", 1)[0]
        if name != own and is_qube_name(top) and _idle(os.path.join(git.repository, name)):
            _commit_one(git, name)
    _commit_one(git, own)


def _fetch_tip(git: Git, branch: str) -> str:
    git("fetch", "--quiet", "origin", f"refs/heads/{branch}")
    return git("rev-parse", "FETCH_HEAD^{commit}").strip()


def _rebase(git: Git, *arguments: str) -> None:
    """Our unpushed commits onto another base, signed again."""
    try:
        git("rebase", "--quiet", "--gpg-sign", *arguments)
    except PublishError:
        git.run("rebase", "--abort")
        raise


def _push(git: Git, commit: str, branch: str) -> bool:
    """True when pushed, False when the remote refused the commit; PublishError when the push
    failed on the way (kept for the next log)."""
    result = git.run("push", "--porcelain", "origin", f"{commit}:refs/heads/{branch}")
    if result.returncode == 0:
        return True
    # --porcelain: `!<TAB>from:to<TAB>[remote rejected] (reason)` when the server's hooks said no;
    # `[rejected]` (not a fast-forward) is a race with another pusher, tried again later.
    for line in result.stdout.splitlines():
        fields = line.split("\t")
        if len(fields) == 3 and fields[0] == "!" and fields[2].startswith("[remote rejected]"):
            return False
    raise PublishError(f"git push failed: {_tool_error(result.stderr + result.stdout)}")


def _set_aside(git: Git, commit: str, base: str) -> list[str]:
    """Moves the logs of a refused commit to SET_ASIDE, and the commits after it onto base."""
    names = git.paths("diff-tree", "--no-commit-id", "--name-only", "-r", commit)
    for name in names:
        kept = os.path.join(git.repository, SET_ASIDE, name)
        os.makedirs(os.path.dirname(kept), mode=0o750, exist_ok=True)
        with open(kept, "wb") as copy:
            shown = subprocess.run(
                [*GIT, git.repository, "cat-file", "blob", f"{commit}:{name}"],
                stdout=copy, stderr=subprocess.DEVNULL, timeout=git.timeout, check=False,
            )  # fmt: skip
        if shown.returncode != 0:
            raise PublishError(f"the refused log {name} could not be set aside")
    _rebase(git, "--onto", base, commit)
    for name in names:
        journal(
            f"the logs repository refused the commit of {name}: set aside as"
            f" {os.path.join(git.repository, SET_ASIDE, name)}"
        )
    return names


def _push_all(git: Git, branch: str, tip: str) -> list[str]:
    """Pushes our commits on tip; the logs of any the remote refuses are set aside (returned).
    At most two pushes per commit."""
    refused: list[str] = []
    base = tip
    while git("rev-list", f"{base}..HEAD").strip():
        if _push(git, "HEAD", branch):
            return refused
        for commit in git("rev-list", "--reverse", f"{base}..HEAD").split():
            if not _push(git, commit, branch):
                refused += _set_aside(git, commit, base)
                break
            base = commit
    return refused


def _age(name: str) -> tuple[str, int, str]:
    match = LOG_NAME.fullmatch(os.path.basename(name))
    if match is None:
        return ("", 0, name)
    return (match.group(1), int(match.group(2) or 0), name)


def _usage(folder: str) -> dict[str, int]:
    """The size of each file under folder, by path."""
    sizes = {}
    for directory, _folders, files in os.walk(folder):
        for file in files:
            path = os.path.join(directory, file)
            with contextlib.suppress(OSError):
                sizes[path] = os.lstat(path).st_size
    return sizes


def _drop(git: Git, name: str) -> None:
    """A published log out of this qube: its working copy, and git's when loose. The index
    marks it skip-worktree, so its absence is never committed; the remote is a promisor, as in
    a partial clone, so git takes a missing object for one it may fetch again (from where the
    log was published), not for damage."""
    git("config", "remote.origin.promisor", "true")
    blob = git("rev-parse", f"HEAD:{name}").strip()
    git("update-index", "--skip-worktree", "--", name)
    os.unlink(os.path.join(git.repository, name))
    loose = os.path.join(git.repository, ".git", "objects", blob[:2], blob[2:])
    with contextlib.suppress(FileNotFoundError):
        os.unlink(loose)


def keep_quota(git: Git, source: str, quota: int) -> list[str]:
    """Removes source's oldest published logs until its logs take at most quota bytes (or none
    published is left). Only after a push: HEAD is then the remote's tip."""
    sizes = _usage(os.path.join(git.repository, source))
    used = sum(sizes.values()) + sum(
        _usage(os.path.join(git.repository, SET_ASIDE, source)).values()
    )
    if used <= quota:
        return []
    published = set(git.paths("ls-tree", "-r", "--name-only", "HEAD", "--", f"{source}/"))
    dropped = []
    for name in sorted(published, key=_age):
        path = os.path.join(git.repository, name)
        if used <= quota:
            break
        if path not in sizes:
            continue
        _drop(git, name)
        used -= sizes[path]
        dropped.append(name)
    return dropped


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
            f" (exit {result.returncode}): {_tool_error(result.stderr.decode('utf-8', 'replace'))}"
        )


def publish(log_path: str, source: str, config: dict[str, Any]) -> None:
    """Commit (signed), push, keep the caller's quota, then tell source's keys qube.
    PublishError says what failed."""
    repository, branch = config["directory"], config["branch"]
    git = Git(repository, float(config["git_timeout"]))
    own = os.path.relpath(log_path, repository)
    try:
        with _locked(repository):
            _exclude_set_aside(repository)
            _commit(git, log_path)
            tip = _fetch_tip(git, branch)
            _require_trusted_tip(git, tip, config["logs_key"])
            _rebase(git, tip)
            refused = _push_all(git, branch, tip)
            keep_quota(git, source, int(config["quota_bytes"]))
    except OSError as error:
        raise PublishError(f"the logs repository {repository} cannot be used: {error}") from None
    if own in refused:
        raise PublishError(
            f"the logs repository refused the log's commit: set aside as"
            f" {os.path.join(repository, SET_ASIDE, own)} (see the build_logs role's README)"
        )
    notify(source, config)
