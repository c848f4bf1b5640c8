"""The build qubes' services on qubesim, called from the net qube as the webhook receiver calls
them (`qrexec-client-vm -- build-ENV SERVICE`), so dom0's policy and qrexec are in the path:
TriggerBuild starts a build only in the environment whose builder knows the component, detached
and one at a time per builder, and a flood of triggers leaves one process and one build;
ProcessGithubCommand runs a maintainer's signed command once and refuses every other, saying
why. The builders are the world's stand-in of qubes-builder, with release configurations of
this test (served by the world's git daemon) that give each environment its own components."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from qubesim import world
from qubesim.layout import current
from tests.integration.conftest import (
    as_root,
    audit_since,
    changed_inventory,
    run_tool,
    serve_release_configs,
    site,
)

BUILDER = "/home/user/builder-services"
LOGS = "/home/user/builder-github-logs"
CONFIGS = {
    "R4.2/fedora.conf": "COMPONENTS = core-admin gui-daemon\n",
    "R4.2/kernel.conf": (
        "COMPONENTS = linux-kernel\n"
        "GIT_URL_linux_kernel = https://github.com/QubesOS/qubes-linux-kernel-latest.git\n"
    ),
}
DAY = 86400


def in_qube(qube: str, command: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return run_tool("qvm-run", "--pass-io", qube, f"bash -lc {json.dumps(command)}",
                    input=input, check=False)  # fmt: skip


def _gpg(home: Path, *argv: str, data: str | None = None) -> str:
    return subprocess.run(["gpg", "--homedir", str(home), "--batch", *argv], input=data,
                          capture_output=True, text=True, check=True).stdout  # fmt: skip


@dataclass
class Services:
    variables: Path
    inventory: str
    gnupg: Path
    maintainer: str
    intruder: str
    commit: str

    def play(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        return site("-e", f"@{self.variables}", *arguments, inventory=self.inventory)

    def sign(self, line: str, key: str | None = None, at: float | None = None) -> str:
        faked = []
        if at is not None:
            faked = ["--faked-system-time", time.strftime("%Y%m%dT%H%M%S!", time.gmtime(at))]
        return _gpg(self.gnupg, *faked, "--local-user", key or self.maintainer, "--clearsign",
                    data=line + "\n")  # fmt: skip

    def upload(self, component: str = "core-admin") -> str:
        return f"Upload-component r4.2 {component} {self.commit} current vm-bookworm"


def _keys(place: Path) -> tuple[Path, str, str]:
    home = place / "gnupg"
    home.mkdir(mode=0o700)
    made = time.strftime("%Y%m%dT%H%M%S", time.gmtime(time.time() - 10 * DAY))
    fingerprints = []
    for uid in ("Maintainer <maintainer@example.org>", "Intruder <intruder@example.org>"):
        _gpg(home, "--faked-system-time", made, "--passphrase", "", "--quick-gen-key", uid,
             "ed25519", "sign", "never")  # fmt: skip
        listing = _gpg(home, "--with-colons", "--list-keys", uid)
        fingerprints.append(
            next(line.split(":")[9] for line in listing.splitlines() if line[:4] == "fpr:")
        )
    return home, fingerprints[0], fingerprints[1]


def _environments(configs: str) -> dict[str, object]:
    builders = {
        env: [{"dir": BUILDER, "release": "4.2", "config_file": f"R4.2/{env}.conf",
               "config_repo": configs}]
        for env in ("fedora", "kernel")
    }  # fmt: skip
    return {
        "fedora": {"logs": "build-logs", "volume_size": "20GiB", "builders": builders["fedora"]},
        "kernel": {"logs": "build-logs", "builders": builders["kernel"]},
    }


def _sources_commit(qube: str) -> str:
    """The built sources of core-admin in qubes-builder's place (what an upload binds to)."""
    sources = f"{BUILDER}/qubes-src/core-admin"
    git = f"git -C {sources} -c user.name=dev -c user.email=dev@example.org"
    commit = f"{git} commit -q --allow-empty -m v4.2.0"
    made = in_qube(qube, f"mkdir -p {sources} && {git} init -q && {commit} && {git} rev-parse HEAD")
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    outside = world.World(current())
    world.up(outside)
    place = tmp_path_factory.mktemp("services")
    gnupg, maintainer, intruder = _keys(place)
    public_key = _gpg(gnupg, "--armor", "--export", maintainer)
    variables = place / "vars.json"
    variables.write_text(
        json.dumps(
            {
                **outside.variables(),
                "keys_vm_key_algorithm": "ed25519",
                "keys_vm_public_keys_dir": str(place / "public-keys"),
                "build_vm_command_signers": {
                    maintainer: {
                        "public_key": public_key,
                        "components": ["core-admin"],
                        "distributions": ["_all_"],
                    }
                },
            }
        )
    )
    variables.chmod(0o600)
    # The environments are the inventory's to describe: the preflight refuses them as extra vars.
    configs = serve_release_configs(outside, place, "services-configs", CONFIGS)
    inventory = changed_inventory(place / "inventory", build_infra_envs=_environments(configs))
    # The qubes outlive a test run, and the world may have been made anew since.
    for env in ("fedora", "kernel"):
        as_root(
            f"build-{env}",
            f"rm -rf {BUILDER} {LOGS} /home/user/.local/state/qubesbuilder",
            check=False,  # not made yet on a new host
        )
    services = Services(variables, inventory, gnupg, maintainer, intruder, "")
    first = services.play()
    assert first.returncode == 0, first.stdout + first.stderr
    services.commit = _sources_commit("build-fedora")
    yield services


def log_files(qube: str) -> set[str]:
    return set(in_qube(qube, f"ls {LOGS} 2>/dev/null").stdout.split())


@dataclass
class Call:
    result: subprocess.CompletedProcess[str]
    decisions: list[str]
    action_logs: list[str]


def call(build_qube: str, service: str, message: str = "") -> Call:
    """service in build_qube, called from the net qube; the decision lines of that call and the
    action logs it started."""
    before = log_files(build_qube)
    result = in_qube("sys-net", f"qrexec-client-vm -- {build_qube} {service}", input=message)
    new = sorted(log_files(build_qube) - before)
    decisions = [name for name in new if name.count("-") == 1]
    text = in_qube(build_qube, " ".join(["cat", *(f"{LOGS}/{n}" for n in decisions)])).stdout
    return Call(
        result, text.splitlines() if decisions else [], [n for n in new if n.count("-") > 1]
    )


# The line an action's log ends with (builder_instances.py's "STAMP done"); a logged make's own
# "> done" (qubes-builder's make-with-log) comes earlier, once per step.
DONE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d done$", re.MULTILINE)


def wait_for_text(qube: str, path: str, text: str | re.Pattern[str], seconds: float = 180) -> str:
    deadline = time.monotonic() + seconds
    while True:
        content = in_qube(qube, f"cat {path} 2>/dev/null").stdout
        if text.search(content) if isinstance(text, re.Pattern) else text in content:
            return content
        assert time.monotonic() < deadline, f"{path} in {qube} never showed {text!r}: {content}"
        time.sleep(0.5)


def commands_run(qube: str) -> list[str]:
    return in_qube(qube, f"cat {BUILDER}/commands.log 2>/dev/null").stdout.splitlines()


def test_a_push_builds_only_where_the_builder_knows_the_component(services: Services) -> None:
    moment = datetime.now(UTC)
    kernel = call("build-kernel", "qubesbuilder.TriggerBuild+core-admin")
    fedora = call("build-fedora", "qubesbuilder.TriggerBuild+core-admin")
    assert kernel.result.returncode == 0 and fedora.result.returncode == 0, fedora.result.stderr
    assert kernel.decisions[0].endswith(
        "from sys-net: no builder knows core-admin: nothing to build"
    )
    assert kernel.action_logs == []
    assert f"build of core-admin pending in {BUILDER} (release 4.2" in fedora.decisions[0]
    assert f"runner of {BUILDER} (release 4.2) started: process " in fedora.decisions[1]
    [output] = fedora.action_logs
    assert output.endswith("-core-admin-4.2.log")
    wait_for_text("build-fedora", f"{LOGS}/{output}", DONE)
    artifact = in_qube("build-fedora", f"cat {BUILDER}/artifacts/core-admin/core-admin.tar")
    assert artifact.stdout.startswith("core-admin, built from ")
    assert in_qube("build-kernel", f"test -e {BUILDER}/artifacts").returncode != 0
    calls = [
        (e["source"], e["actual_target"], e["service"], e["argument"], e["decision"])
        for e in audit_since(moment)
        if e["service"] == "qubesbuilder.TriggerBuild"
    ]
    assert calls == [
        ("sys-net", "build-kernel", "qubesbuilder.TriggerBuild", "core-admin", "allow"),
        ("sys-net", "build-fedora", "qubesbuilder.TriggerBuild", "core-admin", "allow"),
    ]


def test_the_repository_name_builds_its_component(services: Services) -> None:
    kernel = call("build-kernel", "qubesbuilder.TriggerBuild+linux-kernel-latest")
    fedora = call("build-fedora", "qubesbuilder.TriggerBuild+linux-kernel-latest")
    assert "build of linux-kernel pending in" in kernel.decisions[0]
    assert fedora.action_logs == [] and "no builder knows" in fedora.decisions[0]
    wait_for_text("build-kernel", f"{LOGS}/{kernel.action_logs[0]}", DONE)
    assert in_qube("build-kernel", f"test -s {BUILDER}/artifacts/linux-kernel/linux-kernel.tar.asc")


@pytest.mark.parametrize(
    ("argument", "reaches_the_service"),
    [("core.admin", True), ("core-admin+x", True), ("c" * 65, True),
     ("core/admin", False), ("a b", False)],
)  # fmt: skip
def test_a_bad_component_name_never_reaches_a_build(
    services: Services, argument: str, reaches_the_service: bool
) -> None:
    made = call("build-fedora", f"'qubesbuilder.TriggerBuild+{argument}'")
    assert made.result.returncode != 0
    assert made.action_logs == []
    if reaches_the_service:
        assert "refused from sys-net: malformed argument" in made.decisions[0]
    else:  # qrexec refuses a service name with '/' or a space (qrexec-daemon, the request)
        assert made.decisions == []


def test_a_build_waits_for_the_builder_lock_and_the_call_does_not(services: Services) -> None:
    # The user's shell in the qube runs this (in_qube's quoting would expand $! outside).
    holder = run_tool(
        "qvm-run", "--pass-io", "build-fedora",
        f"setsid flock {BUILDER}/builder.lock sleep 600 </dev/null >/dev/null 2>&1 & echo $!",
    )  # fmt: skip
    pid = holder.stdout.strip()
    assert pid.isdigit(), holder.stdout
    try:
        made = call("build-fedora", "qubesbuilder.TriggerBuild+gui-daemon")
        assert made.result.returncode == 0
        [output] = made.action_logs
        waiting = wait_for_text("build-fedora", f"{LOGS}/{output}", "waiting for")
        assert "holding" not in waiting
        assert in_qube("build-fedora", f"test -e {BUILDER}/artifacts/gui-daemon").returncode != 0
    finally:
        as_root("build-fedora", f"pkill -P {pid}; kill {pid}", check=False)
    wait_for_text("build-fedora", f"{LOGS}/{output}", DONE)
    assert in_qube("build-fedora", f"test -s {BUILDER}/artifacts/gui-daemon/gui-daemon.tar")


RUNNER = "python3 /usr/local/lib/qubes-infra-build/[t]rigger_build.py"  # [t]: not pgrep's shell
FLOOD = 50


def trigger_processes(qube: str) -> list[str]:
    """The qube's processes of trigger_build.py (calls in progress and runners)."""
    return in_qube(qube, f"pgrep -f '{RUNNER}'").stdout.split()


def test_a_trigger_flood_leaves_one_process_and_builds_once_after_it(services: Services) -> None:
    """50 pushes of core-admin from the net qube, at once, while build-fedora's builder is busy:
    one process waits (the builder's runner, not one per call), one build is pending, and the
    component is built once when the builder is free (within 180 s)."""
    deadline = time.monotonic() + 60
    while trigger_processes("build-fedora"):  # the runners of the tests before
        assert time.monotonic() < deadline, "a runner of an earlier test never ended"
        time.sleep(0.5)
    holder = run_tool(
        "qvm-run", "--pass-io", "build-fedora",
        f"setsid flock {BUILDER}/builder.lock sleep 600 </dev/null >/dev/null 2>&1 & echo $!",
    )  # fmt: skip
    pid = holder.stdout.strip()
    assert pid.isdigit(), holder.stdout
    before = log_files("build-fedora")
    try:
        calls = in_qube(
            "sys-net",
            f"for i in {{1..{FLOOD}}}; do"
            " (qrexec-client-vm -- build-fedora qubesbuilder.TriggerBuild+core-admin"
            " || echo refused) & done; wait",
        )
        assert calls.returncode == 0 and "refused" not in calls.stdout, calls.stdout
        [runner] = trigger_processes("build-fedora")
        new = sorted(log_files("build-fedora") - before)
        [output] = [name for name in new if name.count("-") > 1]
        decisions = [name for name in new if name.count("-") == 1]
        assert len(decisions) == FLOOD
        text = in_qube("build-fedora", f"cd {LOGS} && cat {' '.join(decisions)}").stdout
        assert text.count("build of core-admin pending in") == 1
        assert text.count("build of core-admin already pending in") == FLOOD - 1
        assert text.count(f"/{output})") == FLOOD
        assert f"started: process {runner}" in text
        waiting = wait_for_text("build-fedora", f"{LOGS}/{output}", "waiting for")
        assert "holding" not in waiting
    finally:
        as_root("build-fedora", f"pkill -P {pid}; kill {pid}", check=False)
    built = wait_for_text("build-fedora", f"{LOGS}/{output}", DONE)
    assert built.count("scripts/auto-build core-admin") == 1
    deadline = time.monotonic() + 60
    while trigger_processes("build-fedora"):
        assert time.monotonic() < deadline, "the runner never ended"
        time.sleep(0.5)
    after = in_qube("build-fedora", f"cat {LOGS}/{output}").stdout
    assert after.count("scripts/auto-build core-admin") == 1


def test_a_signed_upload_runs_once_and_its_copy_is_replayed(services: Services) -> None:
    message = services.sign(services.upload())
    before = commands_run("build-fedora")
    first = call("build-fedora", "qubesbuilder.ProcessGithubCommand", message)
    assert first.result.returncode == 0, first.result.stderr
    assert f"accepted from sys-net: {services.upload()}" in first.decisions[0]
    wait_for_text("build-fedora", f"{LOGS}/{first.action_logs[0]}", DONE)
    variables = "COMPONENTS=core-admin DISTS_VM=bookworm DIST_DOM0="
    assert commands_run("build-fedora") == [
        *before,
        f"update-repo-current {variables} MAKEREPO=1 UPLOAD=0",
        f"update-repo-current {variables} MAKEREPO=0 UPLOAD=1",
    ]
    elsewhere = call("build-kernel", "qubesbuilder.ProcessGithubCommand", message)
    assert f"{BUILDER} does not build core-admin" in elsewhere.decisions[1]
    assert elsewhere.action_logs == []

    again = call("build-fedora", "qubesbuilder.ProcessGithubCommand", message)
    assert again.result.returncode != 0
    assert again.decisions[0].endswith(
        f"refused from sys-net: replayed: Upload-component signed by {services.maintainer}"
        " already ran"
    )
    assert again.action_logs == []
    assert len(commands_run("build-fedora")) == len(before) + 2


def test_commands_that_must_not_run_do_nothing_and_say_why(services: Services) -> None:
    before = commands_run("build-fedora")
    for message, reason in (
        (services.upload() + "\n", "unsigned command: the input is not an inline-signed"),
        (services.sign(services.upload(), key=services.intruder), "untrusted signer: key "),
        (services.sign(services.upload(), at=time.time() - 2 * DAY), "stale signature: made "),
        (services.sign(services.upload("gui-daemon")),
         f"not authorised: {services.maintainer} may not upload component gui-daemon"),
        (services.sign(services.upload()).replace("core-admin", "core-admim"), "bad signature"),
        (services.sign(services.upload().replace(" current", "  current")),
         "malformed command: the command line must be words"),
    ):  # fmt: skip
        refused = call("build-fedora", "qubesbuilder.ProcessGithubCommand", message)
        assert refused.result.returncode != 0, reason
        assert f"refused from sys-net: {reason}" in refused.decisions[0], refused.decisions
        assert refused.action_logs == []
    assert commands_run("build-fedora") == before
