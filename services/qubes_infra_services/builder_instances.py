# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The builders of a build qube, as builder-github's qrexec services see them.

Shared by qubesbuilder.TriggerBuild and qubesbuilder.ProcessGithubCommand: the settings the
build_vm role wrote, the service's own log file, the builders of builders.list (qubes-builder's
format 1, `rRELEASE=DIR`: the collection does not run qubes-builderv2 yet), which components a
builder knows, running an action's steps under the builder's lock, and starting a process
detached from the qrexec call.

Only names that passed the callers' grammar checks reach this module; they are still passed as
single argv elements, never through a shell.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from qubes_infra_services.definitions import (
    is_component,
    is_qube_name,
    load_settings,
    printable,
    settings_path,
)

CONFIG = "/usr/local/etc/qubes-infra-build/build-services.json"
DEFAULTS: dict[str, Any] = {
    "build_log_command": "",
    "builders_list": "~/.config/qubes-builder-github/builders.list",
    "logs_directory": "~/builder-github-logs",
    "keyring": "~/.config/qubes-builder-github/trusted-keys-for-commands.gpg",
    "used_commands": "~/.local/state/qubesbuilder/used-commands.json",
    "triggers_directory": "~/.local/state/qubesbuilder/triggers",
    "callers": [],
    "signers": {},
    "signature_max_age": 86400,
    "max_used_commands": 10000,
    "query_timeout": 120,
}
PATHS = ("builders_list", "logs_directory", "keyring", "used_commands", "triggers_directory")
# What `make get-var` may print about one builder.
MAX_QUERY_OUTPUT = 1 << 20
BUILDERS_LIST_LINE = re.compile(r"r(?P<release>[0-9][0-9.]*)=(?P<dir>/[^=]+)")


def load_config() -> dict[str, Any]:
    """The settings the build_vm role wrote, in the file BUILD_SERVICES_CONFIG names."""
    config = load_settings(settings_path("BUILD_SERVICES_CONFIG", CONFIG), DEFAULTS)
    for name in PATHS:
        config[name] = os.path.expanduser(config[name])
    return config


class ServiceLog:
    """The call's own log, `<logs directory>/<epoch>-<pid>.log` as builder-github names it:
    one line per decision, each saying what was asked and why it was refused or started."""

    def __init__(self, directory: str, service: str) -> None:
        os.makedirs(directory, mode=0o750, exist_ok=True)
        self.base = os.path.join(directory, f"{int(time.time())}-{os.getpid()}")
        self.service = service
        self._file: TextIO = open(self.base + ".log", "a", encoding="utf-8")  # noqa: SIM115

    def line(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        self._file.write(f"{stamp} {self.service}: {printable(text)}\n")
        self._file.flush()

    def action_log(self, name: str, release: str) -> str:
        return f"{self.base}-{name}-{release}.log"


def caller(config: dict[str, Any], log: ServiceLog) -> str | None:
    """The qrexec source if the settings allow it (an empty list allows any); else None, and
    the refusal is logged. dom0's policy already lets only the net qube call."""
    source = os.environ.get("QREXEC_REMOTE_DOMAIN", "")
    allowed = config["callers"]
    if is_qube_name(source) and (not allowed or source in allowed):
        return source
    log.line(f"refused: caller {source!r} is not allowed")
    return None


@dataclass(frozen=True)
class Builder:
    release: str
    directory: str

    @property
    def lock(self) -> str:
        return os.path.join(self.directory, "builder.lock")


def read_builders(path: str) -> list[Builder]:
    """The builders of builders.list whose directory exists; other lines are skipped (the
    role writes this file, so a line it did not write is ignored rather than trusted; so is a
    qubes-builderv2 line, `rRELEASE=DIR=CONFIG`, which no builder here can run)."""
    builders: list[Builder] = []
    if not os.path.isfile(path):
        return builders
    with open(path, encoding="utf-8") as source:
        for line in source:
            match = BUILDERS_LIST_LINE.fullmatch(line.strip())
            if match and os.path.isdir(match["dir"]):
                builders.append(Builder(match["release"], match["dir"]))
    return builders


def _query(argv: Sequence[str], timeout: float) -> str:
    """stdout of a builder's own query command, bounded; empty when it fails."""
    try:
        result = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    if result.returncode != 0:
        return ""
    return result.stdout[:MAX_QUERY_OUTPUT].decode("ascii", "replace")


def repository_name(url: str) -> str:
    """qubes-builder's short name of a component's repository: the URL's last element without
    `.git` and without a `qubes-` prefix."""
    name = url.strip().rstrip("/").rsplit("/", 1)[-1]
    return name.removesuffix(".git").removeprefix("qubes-")


def _names(builder: Builder, timeout: float) -> list[str]:
    make = ["make", "-s", "-C", builder.directory, "get-var", "GET_VAR=COMPONENTS"]
    return [name for name in _query(make, timeout).split() if is_component(name)]


def _repositories(builder: Builder, names: list[str], timeout: float) -> list[str]:
    """Each component's GIT_URL_<component> (`-` as `_`), from qubes-builder's `make get-var`,
    as qubes-builder-github's TriggerBuild asks it."""
    make = ["make", "-s", "-C", builder.directory, "get-var"]
    return [_query([*make, "GET_VAR=GIT_URL_" + name.replace("-", "_")], timeout) for name in names]


def find_component(builder: Builder, wanted: str, timeout: float) -> str | None:
    """The builder's component that `wanted` names, by its name or else by its repository's
    short name (builder-github matches both), or None."""
    names = _names(builder, timeout)
    if wanted in names:
        return wanted
    repositories = _repositories(builder, names, timeout)
    return next(
        (
            name
            for name, url in zip(names, repositories, strict=True)
            if repository_name(url) == wanted
        ),
        None,
    )


def action_environment(config: dict[str, Any]) -> dict[str, str]:
    """What every action runs with besides the service's own environment.

    QUBES_BUILD_LOG_CMD, the command build output streams to: qubes-builder's scripts/make-with-log
    reads it from its environment only (a make variable of that name in a configuration file is
    never seen: make-with-log decides before make runs), so it is exported here, to the scripts
    and make-with-log calls of every action, as builder-github's lib/github-command-upload and
    lib/github-command-build-template export it before theirs. qubes-builder's
    scripts/auto-build-functions.sh (sourced by auto-build and auto-build-template) sets its own,
    the same command with the log's name kept. Empty: unset, and make-with-log runs make without
    a log, as upstream's does.
    """
    command = str(config.get("build_log_command") or "")
    return {"QUBES_BUILD_LOG_CMD": command} if command else {}


def ignore_input() -> None:
    """stdin from /dev/null: nothing more is read from the caller."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)


@dataclass(frozen=True)
class Step:
    """One command of an action, with the variables it adds to the environment."""

    argv: tuple[str, ...]
    environment: tuple[tuple[str, str], ...] = ()


def start_detached(
    builder: Builder,
    steps: Sequence[Step],
    log_path: str,
    environment: Mapping[str, str] | None = None,
) -> int:
    """Run steps one after the other (stopping at the first failure) under the builder's lock,
    output to log_path, with `environment` (action_environment) added to the service's own.
    Returns the child's pid at once; the qrexec call does not wait for the action."""

    def action() -> int:
        redirect_output(log_path)
        with builder_locked(builder):
            return run_steps(builder, steps, environment or {})

    return fork_detached(action)


def fork_detached(child: Callable[[], int]) -> int:
    """child() in a new process, in a session of its own with nothing of the qrexec call's
    streams (else the call would last as long as it does); its pid, at once."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    try:  # the child: it must never return into the caller's code
        os.setsid()
        redirect_output(os.devnull)
        os._exit(child())
    except BaseException:
        os._exit(127)


def redirect_output(log_path: str) -> None:
    """stdin from /dev/null, stdout and stderr appended to log_path."""
    ignore_input()
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)


def say(text: str) -> None:
    """A time-stamped line of the action's log (stdout, as redirect_output set it)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    os.write(1, f"{stamp} {text}\n".encode("ascii", "replace"))


@contextlib.contextmanager
def builder_locked(builder: Builder) -> Iterator[None]:
    """The builder's lock: flock(2) on DIR/builder.lock, as qubes-builder-github's `flock -x`,
    one action at a time per builder, the others wait their turn. The lock's descriptor is
    never passed on (subprocess closes it in the action's programs), so a daemon an action
    leaves behind does not hold the builder."""
    with open(builder.lock, "a") as lock:
        say(f"waiting for {builder.lock}")
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def run_steps(builder: Builder, steps: Sequence[Step], environment: Mapping[str, str]) -> int:
    """The steps in the builder's directory, one after the other, until one fails; the caller
    holds the builder's lock."""
    say(f"holding {builder.lock}")
    for step in steps:
        say("running " + " ".join(step.argv))
        code = subprocess.run(
            step.argv,
            cwd=builder.directory,
            env={**os.environ, **environment, **dict(step.environment)},
            stdin=subprocess.DEVNULL,
            check=False,
        ).returncode
        if code != 0:
            say(f"exit {code}: stopping")
            return code
    say("done")
    return 0
