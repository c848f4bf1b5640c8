# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""qubesbuilder.TriggerBuild+COMPONENT: build a component GitHub reported a push of.

Run by /usr/local/etc/qubes-rpc/qubesbuilder.TriggerBuild in a build qube; dom0 lets the net
qube call it. The argument is the only input (stdin is not read) and is hostile: exactly one
component name (definitions: 1 to 64 characters of [A-Za-z0-9_-], not starting with '-', which
a build's programs would read as an option; builder-github forbids '/', '.' and space; qrexec
already turned other characters into '_'). Every builder of builders.list that knows the component,
by name or by its repository's short name, gets a pending build of it; the call returns at
once. Every decision is a line of ~/builder-github-logs/<epoch>-<pid>.log, each build's output
goes to <same>-<component>-<release>.log; only the exit code goes back to the caller.

Pending builds and the bound on processes. qubes-builder-github starts one `flock` process per
call, each waiting for the builder's lock: a flood of calls is a flood of processes. Here the
pending builds of a builder are a set on disk, one file per component
(<triggers directory>/r<release>-<digest of the directory>/pending/<component>), and one process
per builder, its runner, builds them one after the other, oldest first, each under the
builder's lock, and ends when none is left. So whatever the number of calls, once they have
returned a build qube keeps at most ONE trigger process per builder of builders.list (the
runner, waiting for the lock or running one build, whose own programs are the build's), and
at most one pending build per builder and component.

No accepted trigger is lost. A trigger of a component already pending joins that build, which
has not started yet and fetches the sources when it does, so it covers the newer push. A build
leaves the pending set only once its runner holds the builder's lock, just before it starts;
from then on a trigger of that component makes it pending again, so it is built once more
after the running build. The pending set outlives its runner: a runner that dies (killed, or
the qube shut down) leaves its pending builds, and every call starts a runner for every builder
that has pending builds and none running.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from qubes_infra_services.builder_actions import build_steps
from qubes_infra_services.builder_instances import (
    Builder,
    ServiceLog,
    action_environment,
    builder_locked,
    caller,
    find_component,
    fork_detached,
    ignore_input,
    load_config,
    read_builders,
    redirect_output,
    run_steps,
)
from qubes_infra_services.definitions import component_problem, is_component


def argument(argv: list[str]) -> str:
    """The component argument, or ValueError naming the rule it breaks."""
    if len(argv) != 2:
        raise ValueError(f"expected exactly one argument, got {len(argv) - 1}")
    value = argv[1]
    problem = component_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


@dataclass(frozen=True)
class Pending:
    """The pending builds of one builder, and the locks that keep them consistent: state.lock
    for a moment around every change, runner.lock for the whole life of the builder's runner
    (the kernel drops it when the runner dies, however it dies)."""

    builder: Builder
    directory: str

    @classmethod
    def of(cls, builder: Builder, root: str) -> Pending:
        digest = hashlib.sha256(builder.directory.encode("utf-8", "replace")).hexdigest()[:16]
        return cls(builder, os.path.join(root, f"r{builder.release}-{digest}"))

    @property
    def folder(self) -> str:
        return os.path.join(self.directory, "pending")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        with open(os.path.join(self.directory, "state.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def add(self, component: str, log_name: str) -> str | None:
        """Make the component's build pending, its output to log_name; None if it was, else
        the log of the build already pending. The caller holds the lock."""
        try:
            with open(os.path.join(self.folder, component), "x", encoding="ascii") as entry:
                entry.write(log_name)
        except FileExistsError:
            return self.log_of(component)
        return None

    def log_of(self, component: str) -> str:
        """The log the pending build's output goes to (a new name if the entry is damaged)."""
        with contextlib.suppress(OSError, UnicodeDecodeError):
            with open(os.path.join(self.folder, component), encoding="ascii") as entry:
                name = entry.read(300)
            if name.endswith(".log") and os.path.basename(name) == name and name[0] != ".":
                return name
        return f"{int(time.time())}-{os.getpid()}-{component}-{self.builder.release}.log"

    def oldest(self) -> str | None:
        """The component pending for longest, or None; the caller holds the lock."""
        with os.scandir(self.folder) as entries:
            found = [
                (entry.stat().st_mtime_ns, entry.name)
                for entry in entries
                if is_component(entry.name) and entry.is_file()
            ]
        return min(found)[1] if found else None

    def remove(self, component: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.folder, component))

    def claim_runner(self) -> int | None:
        """A descriptor holding runner.lock if builds are pending and no runner holds it; the
        caller holds the state lock and gives the descriptor to the runner it starts."""
        if self.oldest() is None:
            return None
        runner = os.open(
            os.path.join(self.directory, "runner.lock"), os.O_WRONLY | os.O_CREAT, 0o600
        )
        try:
            fcntl.flock(runner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(runner)
            return None
        return runner


def start_runner(pending: Pending, config: dict[str, Any]) -> int | None:
    """The pid of the runner started for the builder's pending builds; None when none is
    pending or its runner is at work."""
    with pending.locked():
        runner = pending.claim_runner()
    if runner is None:
        return None
    try:
        # The child inherits runner.lock's descriptor, so it holds the lock once ours is closed.
        return fork_detached(lambda: run_pending(pending, config, runner))
    finally:
        os.close(runner)


def run_pending(pending: Pending, config: dict[str, Any], runner: int) -> int:
    """The runner: each pending build, oldest first, until none is left."""
    while True:
        with pending.locked():
            component = pending.oldest()
            if component is None:
                # Let go of runner.lock inside the state lock: a trigger that comes after
                # sees no runner and starts one.
                os.close(runner)
                return 0
            log_name = pending.log_of(component)
        build(pending, component, os.path.join(config["logs_directory"], log_name), config)


def build(pending: Pending, component: str, log_path: str, config: dict[str, Any]) -> int:
    redirect_output(log_path)
    with builder_locked(pending.builder):
        # The build is no longer pending from here: it has not fetched the sources yet, and a
        # trigger from now on makes the component pending again.
        with pending.locked():
            pending.remove(component)
        steps = build_steps(pending.builder, component)
        return run_steps(pending.builder, steps, action_environment(config))


def request(pending: Pending, component: str, log: ServiceLog, source: str) -> None:
    """Make the component's build pending in the builder, or join the one that is."""
    builder = pending.builder
    output = log.action_log(component, builder.release)
    with pending.locked():
        joined = pending.add(component, os.path.basename(output))
        if joined is None:  # the log's first line, before the runner can see the build
            with open(output, "a", encoding="ascii") as out:
                out.write(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} pending\n")
    where = f"in {builder.directory} (release {builder.release}"
    if joined is None:
        log.line(f"from {source}: build of {component} pending {where}, log {output})")
    else:
        existing = os.path.join(os.path.dirname(output), joined)
        log.line(f"from {source}: build of {component} already pending {where}, log {existing})")


def main(argv: list[str]) -> int:
    ignore_input()
    config = load_config()
    log = ServiceLog(config["logs_directory"], "qubesbuilder.TriggerBuild")
    source = caller(config, log)
    if source is None:
        return 1
    try:
        wanted = argument(argv)
    except ValueError as error:
        log.line(f"refused from {source}: malformed argument: {error}")
        return 1
    known = False
    for builder in read_builders(config["builders_list"]):
        pending = Pending.of(builder, config["triggers_directory"])
        component = find_component(builder, wanted, float(config["query_timeout"]))
        if component is not None:
            request(pending, component, log, source)
            known = True
        # Also for the other builders: a runner that died left its pending builds.
        pid = start_runner(pending, config)
        if pid is not None:
            log.line(
                f"runner of {builder.directory} (release {builder.release}) started: process {pid}"
            )
    if not known:
        log.line(f"from {source}: no builder knows {wanted}: nothing to build")
    return 0
