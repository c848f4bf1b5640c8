"""The webhooks role on qubesim: nginx, the receiver and the worker in sys-net as systemd units,
reached over loopback as GitHub would reach them, delivering to stand-in build services that
record every call, with the audit log as the witness of which qrexec calls the net qube made."""

from __future__ import annotations

import contextlib
import http.client
import json
import secrets
import selectors
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.integration.conftest import as_root, audit_since, run_tool, site
from tests.utils import github_webhook

NET = "sys-net"
NET_TEMPLATE = "debian-12"  # the example inventory's build_infra_net_template
TARGET = "qubes-infra-webhooks.target"
NGINX = "qubes-infra-webhooks-nginx.service"
RECEIVER = "qubes-infra-webhooks-receiver.service"
WORKER = "qubes-infra-webhooks-worker.service"
UNITS = (NGINX, RECEIVER, WORKER)
BUILD_QUBES = ("build-fedora", "build-kernel")
STATE = "/home/user/.local/state/qubes-infra-build/webhooks"
TRIGGER = "/api/services/trigger_build"
COMMENT = "/api/services/process_comment"
MAX_BODY = 2097152  # the role's default webhooks_max_body
RPC = "/usr/local/etc/qubes-rpc"
CALLS = "/home/user/webhook-test-calls"
COMMANDS = "/home/user/webhook-test-commands"
SLOW = "/home/user/webhook-test-slow"
# Stand-ins for the build qubes' services (the build_vm role's are tested on their own): they
# record the caller, the argument and stdin; with SLOW present a trigger takes 2 s.
STAND_INS = {
    "qubesbuilder.TriggerBuild": (
        f'#!/bin/sh\necho "$QREXEC_REMOTE_DOMAIN ${{1:-}}" >> {CALLS}\n[ ! -e {SLOW} ] || sleep 2\n'
    ),
    "qubesbuilder.ProcessGithubCommand": (
        f'#!/bin/sh\n{{ echo "from $QREXEC_REMOTE_DOMAIN"; cat; echo end; }} >> {COMMANDS}\n'
    ),
}
SIGNED_COMMAND = (
    "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n"
    "Build-template r4.2 debian-12 202611290800\n"
    "-----BEGIN PGP SIGNATURE-----\n\niHUEARYIAB0WIQ==\n=abcd\n-----END PGP SIGNATURE-----"
)


@dataclass
class Hooks:
    secret: str
    variables: Path

    def play(
        self, *arguments: str, tags: str = "dom0,webhooks"
    ) -> subprocess.CompletedProcess[str]:
        return site("-e", f"@{self.variables}", "--tags", tags, *arguments)

    def post(
        self, route: str, body: bytes, connection: http.client.HTTPConnection | None = None,
        **options: str,
    ) -> tuple[int, str]:  # fmt: skip
        """POST to the net qube (port 80 unless a connection is given), as GitHub does; the
        status and the delivery id (options: event, delivery, signed)."""
        options.setdefault("delivery", str(uuid.uuid4()))
        status, _ = github_webhook.post(
            connection or http.client.HTTPConnection("127.0.0.1", 80, timeout=60),
            route,
            body,
            secret=self.secret.encode(),
            **options,
        )
        return status, options["delivery"]


def push(full_name: str) -> bytes:
    return github_webhook.push_body(full_name)  # each differs: the receiver acts on one once


def wait_for(condition: Callable[[], bool], seconds: float = 120) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.3)
    return condition()


def read(qube: str, path: str) -> str:
    return as_root(qube, f"cat {path} 2>/dev/null || true").stdout


def triggered(qube: str) -> list[str]:
    """Components qube's TriggerBuild was called with by the net qube, in order."""
    lines = read(qube, CALLS).splitlines()
    return [line.split(" ", 1)[1] for line in lines if line.startswith(f"{NET} ")]


def log_lines() -> list[str]:
    return read(NET, f"{STATE}/webhooks.log.1 {STATE}/webhooks.log").splitlines()


def net_calls(since: datetime) -> list[dict[str, object]]:
    return [entry for entry in audit_since(since) if entry["source"] == NET]


def delivered_everything_before(hooks: Hooks) -> str:
    """A fresh component pushed last: once every build qube has it, the worker (which delivers
    in order) has delivered everything accepted before."""
    component = f"barrier-{secrets.token_hex(4)}"
    status, _ = hooks.post(TRIGGER, push(f"QubesOS/qubes-{component}"))
    assert status == 202
    assert wait_for(lambda: all(component in triggered(qube) for qube in BUILD_QUBES))
    return component


@pytest.fixture(scope="module")
def hooks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hooks]:
    place = tmp_path_factory.mktemp("webhooks")
    variables = place / "vars.json"
    variables.write_text(json.dumps({"webhooks_secret": secrets.token_hex(32)}))
    variables.chmod(0o600)
    hooks = Hooks(json.loads(variables.read_text())["webhooks_secret"], variables)
    first = hooks.play()
    assert first.returncode == 0, first.stdout + first.stderr
    for qube in BUILD_QUBES:
        for service, script in STAND_INS.items():
            path = f"{RPC}/{service}"
            keep_original = f"{{ [ ! -e {path} ] || mv {path} {path}.saved; }}"
            install = f"cat > {path} && chmod 0755 {path}"
            as_root(qube, f"mkdir -p {RPC} && {keep_original} && {install}", input=script)
        as_root(qube, f"rm -f {CALLS} {COMMANDS} {SLOW}")
    yield hooks
    for qube in BUILD_QUBES:
        for service in STAND_INS:
            path = f"{RPC}/{service}"
            as_root(qube, f"rm -f {path} {CALLS} {COMMANDS} {SLOW}; "
                          f"[ ! -e {path}.saved ] || mv {path}.saved {path}")  # fmt: skip


def test_the_services_are_systemd_units_of_one_target(hooks: Hooks) -> None:
    assert states(TARGET, *UNITS) == ["active"] * 4
    # Started from rc.local at each start of the qube, the units being in /usr/local.
    rc_local = read(NET, "/rw/config/rc.local")
    assert f"systemctl daemon-reload\nsystemctl start {TARGET}\n" in rc_local
    listed = as_root(NET, "ls /usr/local/lib/systemd/system").stdout.split()
    assert set(listed) >= {TARGET, *UNITS}


def test_a_killed_receiver_or_worker_comes_back(hooks: Hooks) -> None:
    delivered_everything_before(hooks)
    for unit in (RECEIVER, WORKER):
        killed = main_pid(unit)
        as_root(NET, f"kill -KILL {killed}")
        assert wait_for(
            lambda unit=unit, killed=killed: (
                states(unit) == ["active"] and main_pid(unit) not in ("0", killed)
            ),
            seconds=30,
        ), unit
    # A signed push is accepted (202) and delivered again.
    delivered_everything_before(hooks)


def test_a_signed_push_triggers_its_component_in_every_build_qube(hooks: Hooks) -> None:
    started = datetime.now(UTC)
    component = f"core-admin-{secrets.token_hex(4)}"
    status, delivery = hooks.post(TRIGGER, push(f"QubesOS/qubes-{component}"))
    assert status == 202
    assert wait_for(lambda: all(component in triggered(qube) for qube in BUILD_QUBES))
    calls = {
        (entry["target"], entry["service"], entry["argument"], entry["decision"])
        for entry in net_calls(started)
    }
    assert calls == {
        (qube, "qubesbuilder.TriggerBuild", component, "allow") for qube in BUILD_QUBES
    }

    def lines() -> list[str]:
        return [line for line in log_lines() if f"delivery={delivery}" in line]

    # One line for the request, then one per build qube's call (each qube's own, in any order).
    assert wait_for(lambda: len(lines()) == 1 + len(BUILD_QUBES), seconds=30)
    accepted = lines()
    assert "decision=accepted" in accepted[0] and f"component={component}" in accepted[0]
    assert all("decision=delivered" in line for line in accepted[1:])
    codes = sorted(line.split('reason="')[1].split('"')[0] for line in accepted[1:])
    assert codes == ["build-fedora:0", "build-kernel:0"]


def test_a_signed_command_goes_to_process_github_command_in_every_build_qube(
    hooks: Hooks,
) -> None:
    started = datetime.now(UTC)
    body = f"Please build:\r\n\r\n{SIGNED_COMMAND.replace(chr(10), '  ' + chr(13) + chr(10))}\r\n"
    payload = json.dumps(
        {"action": "created", "issue": {"number": 1}, "comment": {"body": body}}
    ).encode()
    status, _ = hooks.post(COMMENT, payload, event="issue_comment")
    assert status == 202
    received = f"from {NET}\n{SIGNED_COMMAND}\nend\n"
    assert wait_for(lambda: all(received in read(qube, COMMANDS) for qube in BUILD_QUBES))
    services = {(entry["target"], entry["service"]) for entry in net_calls(started)}
    assert services == {(qube, "qubesbuilder.ProcessGithubCommand") for qube in BUILD_QUBES}


def test_refused_and_ignored_requests_make_no_qrexec_call(hooks: Hooks) -> None:
    started = datetime.now(UTC)
    good = push("QubesOS/qubes-core-admin")
    statuses = {
        "no signature": hooks.post(TRIGGER, good, signed=""),
        "wrong signature": hooks.post(TRIGGER, good, signed="sha256=" + "0" * 64),
        "unknown event": hooks.post(TRIGGER, good, event="issues"),
        "oversized": hooks.post(TRIGGER, b" " * (MAX_BODY + 1)),
        "malformed": hooks.post(TRIGGER, b'{"repository": '),
        "slash": hooks.post(TRIGGER, push("QubesOS/qubes-core/admin")),
        "dot": hooks.post(TRIGGER, push("QubesOS/qubes-core.admin")),
        "space": hooks.post(TRIGGER, push("QubesOS/qubes-core admin")),
        "long": hooks.post(TRIGGER, push("QubesOS/qubes-" + "a" * 65)),
    }
    assert {name: status for name, (status, _) in statuses.items()} == {
        "no signature": 403,
        "wrong signature": 403,
        "unknown event": 200,
        "oversized": 413,
        "malformed": 400,
        "slash": 400,
        "dot": 400,
        "space": 400,
        "long": 400,
    }
    barrier = delivered_everything_before(hooks)
    arguments = {(entry["service"], entry["argument"]) for entry in net_calls(started)}
    assert arguments == {("qubesbuilder.TriggerBuild", barrier)}
    lines = log_lines()
    for name, (_, delivery) in statuses.items():
        if name == "oversized":
            continue  # answered by nginx, logged in its services.log without a delivery id
        [line] = [line for line in lines if f"delivery={delivery} " in line]
        assert ("decision=ignored" if name == "unknown event" else "decision=refused") in line
    refused_by_nginx = read(NET, f"{STATE}/services.log").splitlines()
    assert any("status=413 decision=refused" in line for line in refused_by_nginx)


def test_the_role_refuses_to_deploy_without_a_secret(hooks: Hooks) -> None:
    before = as_root(NET, "sha256sum /usr/local/etc/qubes-infra-build/webhooks-secret").stdout
    refused = hooks.play("-e", "webhooks_secret=", "--limit", f"localhost,{NET}")
    assert refused.returncode != 0
    assert "The webhooks role needs webhooks_secret" in refused.stdout
    after = as_root(NET, "sha256sum /usr/local/etc/qubes-infra-build/webhooks-secret").stdout
    assert after == before


def test_the_role_refuses_a_folder_that_does_not_persist(hooks: Hooks) -> None:
    """/etc of an AppVM is its template's, and what the role wrote there would go at the next
    shutdown: the role stops before it changes anything, naming the variable."""
    refused = hooks.play(
        "-e", "webhooks_etc_dir=/etc/qubes-infra-build", "--limit", f"localhost,{NET}"
    )
    assert refused.returncode != 0
    assert "webhooks_etc_dir must be a folder that persists in the net qube" in refused.stdout
    assert as_root(NET, "test -e /etc/qubes-infra-build", check=False).returncode == 1


def main_pid(unit: str) -> str:
    return as_root(NET, f"systemctl show --property=MainPID --value {unit}").stdout.strip()


def states(*units: str) -> list[str]:
    """`systemctl is-active` of each unit in the net qube."""
    return as_root(NET, f"systemctl is-active {' '.join(units)}", check=False).stdout.split()


def service_pids() -> dict[str, str]:
    return {unit: main_pid(unit) for unit in UNITS}


def service_memory_kib() -> int:
    """Resident memory of nginx, gunicorn and the worker in the net qube."""
    listing = as_root(NET, "ps -eo rss=,args=").stdout.splitlines()
    services = ("nginx", "gunicorn", "webhook_worker.py")
    return sum(int(line.split()[0]) for line in listing if any(s in line for s in services))


def test_500_webhooks_in_10_seconds_are_each_accounted_for_and_coalesced(hooks: Hooks) -> None:
    delivered_everything_before(hooks)
    pids, memory = service_pids(), service_memory_kib()
    prefix = f"load-{secrets.token_hex(3)}"
    sent: dict[str, tuple[str, int]] = {}  # delivery -> (component or "", status)
    started = time.monotonic()
    for number in range(500):
        # A bounded loop: at most one request every 20 ms.
        time.sleep(max(0.0, started + number * 0.02 - time.monotonic()))
        component = f"{prefix}-{number % 5}"
        if number % 10 == 9:
            status, delivery = hooks.post(TRIGGER, push(f"QubesOS/{component}"), signed="x")
            component = ""
        else:
            status, delivery = hooks.post(TRIGGER, push(f"QubesOS/qubes-{component}"))
        sent[delivery] = (component, status)
    valid = {d: s for d, (c, s) in sent.items() if c}
    assert {s for d, (c, s) in sent.items() if not c} == {403}
    assert set(valid.values()) <= {202, 200, 503}, sorted(set(valid.values()))
    accepted = [d for d, s in valid.items() if s == 202]
    assert sum(1 for s in valid.values() if s == 200) > 0  # coalesced

    delivered_everything_before(hooks)
    lines = log_lines()
    decisions: dict[str, list[str]] = {}
    for line in lines:
        if "delivery=" in line:
            delivery = line.split("delivery=")[1].split()[0]
            decisions.setdefault(delivery, []).append(line.split("decision=")[1].split()[0])
    for delivery, status in valid.items():
        got = decisions.get(delivery, [])
        if status == 202:
            # Then each build qube calls it, or folds it into a trigger still waiting for it.
            assert got[0] == "accepted" and len(got) == 1 + len(BUILD_QUBES), (delivery, got)
            assert set(got[1:]) <= {"delivered", "coalesced"}, (delivery, got)
        else:
            wanted = {200: ["coalesced"], 503: ["refused"]}[status]
            assert got == wanted, (delivery, status, got)
    folded = {line.split("delivery=")[1].split()[0] for line in lines
              if "qube=build-fedora " in line and "decision=coalesced" in line}  # fmt: skip
    calls = [c for c in triggered("build-fedora") if c.startswith(prefix)]
    assert len(calls) == len(set(accepted) - folded) < len(valid)

    assert service_pids() == pids
    assert service_memory_kib() < memory + 64 * 1024


def rc_local_done() -> bool:
    """qvm-start returns once the qube's qrexec agent is up, as on Qubes: rc.local, which starts
    the webhooks services and waits for them, may still be running until this is true."""
    return as_root(NET, "systemctl is-active qubes-misc-post.service", check=False).returncode == 0


def test_a_restart_of_the_net_qube_loses_no_accepted_event(hooks: Hooks) -> None:
    delivered_everything_before(hooks)
    for qube in BUILD_QUBES:
        as_root(qube, f"touch {SLOW}")
    components = [f"restart-{secrets.token_hex(3)}-{number}" for number in range(4)]
    try:
        for component in components:
            assert hooks.post(TRIGGER, push(f"QubesOS/qubes-{component}"))[0] == 202
        # Killed as by a crash: the slow build services keep most events in the spool.
        run_tool("qvm-kill", NET)
        run_tool("qvm-start", NET)
        assert wait_for(rc_local_done)
    finally:
        for qube in BUILD_QUBES:
            as_root(qube, f"rm -f {SLOW}")
    delivered_everything_before(hooks)
    for qube in BUILD_QUBES:
        assert set(components) <= set(triggered(qube)), qube


def test_the_net_templates_own_nginx_service_does_not_take_the_port(hooks: Hooks) -> None:
    """Debian's nginx package enables nginx.service, with its default site on port 80, in every
    qube of the template: the templates role disables it in the net template, so that the net
    qube, once restarted from it, serves port 80 with the receiver alone."""
    enabled = False
    try:
        # As the package's postinst does (qubesim made the template without the host's enabled
        # units).
        as_root(NET_TEMPLATE, "systemctl enable nginx.service")
        enabled = True
        run_tool("qvm-shutdown", "--wait", NET_TEMPLATE)
        played = hooks.play(tags="dom0,templates,webhooks")
        assert played.returncode == 0, played.stdout + played.stderr
        # The net qube has its template's packages, so the templates role left it running: it
        # restarts here, from the template's root as the role left it.
        run_tool("qvm-shutdown", "--wait", "--force", NET)
        run_tool("qvm-start", NET)
        assert wait_for(rc_local_done)
        enabled_here = as_root(NET, "systemctl is-enabled nginx.service", check=False).stdout
        assert (enabled_here.strip(), states("nginx.service")) == ("disabled", ["inactive"])
        enabled = False
        assert states(*UNITS) == ["active"] * 3
        delivered_everything_before(hooks)  # a signed push on port 80: 202, then delivered
    finally:
        if enabled:
            as_root(NET_TEMPLATE, "systemctl disable nginx.service", check=False)
            run_tool("qvm-shutdown", "--wait", NET_TEMPLATE, check=False)


def test_tls_and_the_source_allow_list(hooks: Hooks, tmp_path: Path) -> None:
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-days", "2", "-keyout", str(tmp_path / "key"), "-out", str(tmp_path / "cert")],
        capture_output=True, check=True,
    )  # fmt: skip
    tls = tmp_path / "tls.json"
    tls.write_text(json.dumps({"webhooks_port": 8443,
                               "webhooks_tls_certificate": (tmp_path / "cert").read_text(),
                               "webhooks_tls_key": (tmp_path / "key").read_text()}))  # fmt: skip
    context = ssl.create_default_context(cafile=str(tmp_path / "cert"))

    def https() -> http.client.HTTPConnection:
        return http.client.HTTPSConnection("127.0.0.1", 8443, timeout=60, context=context)

    started = datetime.now(UTC)
    try:
        elsewhere = hooks.play(
            "-e", f"@{tls}", "-e", '{"webhooks_allowed_networks": ["10.0.0.0/8"]}'
        )
        assert elsewhere.returncode == 0, elsewhere.stdout + elsewhere.stderr
        body = push("QubesOS/qubes-tls-refused")
        assert hooks.post(TRIGGER, body, connection=https())[0] == 403
        here = hooks.play("-e", f"@{tls}", "-e", '{"webhooks_allowed_networks": ["127.0.0.1"]}')
        assert here.returncode == 0, here.stdout + here.stderr
        assert hooks.post(TRIGGER, push("QubesOS/qubes-tls-allowed"), connection=https())[0] == 202
        assert wait_for(lambda: all("tls-allowed" in triggered(qube) for qube in BUILD_QUBES))
    finally:
        restored = hooks.play()
    assert restored.returncode == 0, restored.stdout + restored.stderr
    arguments = {entry["argument"] for entry in net_calls(started)}
    assert "tls-refused" not in arguments and "tls-allowed" in arguments
    assert hooks.post(TRIGGER, b"{}", signed="")[0] == 403  # plain HTTP on port 80 again
    key = as_root(NET, "ls /usr/local/etc/qubes-infra-build").stdout.split()
    assert "webhooks-tls.key" not in key


# -- delivery: one qube's slowness costs the others nothing
SETTINGS = "/usr/local/etc/qubes-infra-build/webhooks.json"
TRIGGER_SERVICE = f"{RPC}/qubesbuilder.TriggerBuild"
SLOW_QUBE = "build-kernel"
GATE = "/home/user/webhook-test-gate"
# A build qube's TriggerBuild that hangs while GATE exists (for 2 minutes at most).
HANGING_TRIGGER = (
    f'#!/bin/sh\necho "$QREXEC_REMOTE_DOMAIN ${{1:-}}" >> {CALLS}\n'
    f"n=0\nwhile [ -e {GATE} ] && [ $n -lt 600 ]; do sleep 0.2; n=$((n + 1)); done\n"
)
# One that exits 126 by itself, qrexec's code for a refused call.
EXIT_126_TRIGGER = f'#!/bin/sh\necho "$QREXEC_REMOTE_DOMAIN ${{1:-}}" >> {CALLS}\nexit 126\n'


def use_settings(text: str) -> None:
    """The net qube's webhooks settings, taken up by the receiver and the worker."""
    as_root(NET, f"cat > {SETTINGS}", input=text)
    as_root(NET, f"systemctl restart {RECEIVER} {WORKER}")


def spool_files(folder: str) -> list[str]:
    listed = as_root(NET, f"ls -1 {STATE}/spool/{folder}", check=False).stdout.split()
    return sorted(name for name in listed if name.startswith(("trigger-", "command-")))


def test_a_hanging_build_qube_delays_no_other_and_never_makes_github_get_503(
    hooks: Hooks,
) -> None:
    """build-kernel hangs in its first call. With the receiver's part of the spool cut to 4
    events and each qube's queue to 3, ten pushes at 0.3 s intervals all get 202, build-fedora
    gets all ten within 30 s, and build-kernel holds one call and 3 waiting events (the older
    ones dropped and logged) apart from anything the receiver counts."""
    delivered_everything_before(hooks)
    original = read(NET, SETTINGS)
    prefix = f"hang-{secrets.token_hex(3)}"
    sent = [f"{prefix}-{number}" for number in range(10)]
    try:
        use_settings(json.dumps(json.loads(original) | {"spool_max_events": 4,
                                                        "queue_max_events": 3}))  # fmt: skip
        as_root(SLOW_QUBE, f"touch {GATE} && cat > {TRIGGER_SERVICE}", input=HANGING_TRIGGER)
        statuses = []
        for component in sent:
            statuses.append(hooks.post(TRIGGER, push(f"QubesOS/qubes-{component}"))[0])
            time.sleep(0.3)
        assert statuses == [202] * len(sent)
        assert wait_for(
            lambda: [c for c in triggered("build-fedora") if c.startswith(prefix)] == sent,
            seconds=30,
        )
        assert [c for c in triggered(SLOW_QUBE) if c.startswith(prefix)] == sent[:1]
        assert spool_files(f"queues/{SLOW_QUBE}") == sorted(f"trigger-{c}" for c in sent[-3:])
        assert spool_files(f"queues/{SLOW_QUBE}/active") == [f"trigger-{sent[0]}"]
        assert spool_files("") == [] and spool_files("queues/build-fedora") == []
        dropped = [line.split("component=")[1].split()[0] for line in log_lines()
                   if f"qube={SLOW_QUBE} " in line and "decision=dropped" in line]  # fmt: skip
        assert dropped[-6:] == sent[1:7]
    finally:
        as_root(SLOW_QUBE, f"rm -f {GATE} && cat > {TRIGGER_SERVICE}",
                input=STAND_INS["qubesbuilder.TriggerBuild"])  # fmt: skip
        use_settings(original)
    # The restarted worker calls build-kernel again with the interrupted event, then its queue.
    assert wait_for(lambda: set(sent[:1] + sent[-3:]) <= set(triggered(SLOW_QUBE)), seconds=60)
    delivered_everything_before(hooks)


def test_a_build_qubes_own_exit_code_126_is_not_taken_for_a_refusal(hooks: Hooks) -> None:
    delivered_everything_before(hooks)
    started = datetime.now(UTC)
    component = f"exit-126-{secrets.token_hex(3)}"
    try:
        as_root(SLOW_QUBE, f"cat > {TRIGGER_SERVICE}", input=EXIT_126_TRIGGER)
        status, delivery = hooks.post(TRIGGER, push(f"QubesOS/qubes-{component}"))
        assert status == 202
        # Calls to a qube are made in order: a repeated call would come before the barrier's.
        delivered_everything_before(hooks)
    finally:
        as_root(SLOW_QUBE, f"cat > {TRIGGER_SERVICE}", input=STAND_INS["qubesbuilder.TriggerBuild"])
    calls = [entry["target"] for entry in net_calls(started) if entry["argument"] == component]
    assert sorted(calls) == sorted(BUILD_QUBES)
    [line] = [line for line in log_lines() if f"qube={SLOW_QUBE} delivery={delivery} " in line]
    assert f'decision=delivered reason="{SLOW_QUBE}:126"' in line


# -- the listener: limits per source, replays
PER_SOURCE = 8  # the role's default webhooks_connections_per_source


def slow_clients(source: str, count: int) -> list[socket.socket]:
    """count requests from source whose 1 MiB bodies come slowly: 64 KiB at once, then a byte
    now and then (trickle), never the whole."""
    held = []
    for _ in range(count):
        client = socket.socket()
        client.settimeout(30)
        client.bind((source, 0))
        client.connect(("127.0.0.1", 80))
        client.sendall(
            f"POST {TRIGGER} HTTP/1.1\r\nHost: x\r\nX-GitHub-Event: push\r\n"
            f"X-Hub-Signature-256: sha256=00\r\nContent-Length: {1 << 20}\r\n\r\n".encode()
            + b" " * 65536
        )
        held.append(client)
    return held


def trickle(clients: list[socket.socket], stop: threading.Event) -> None:
    while not stop.wait(1):
        for client in clients:
            with contextlib.suppress(OSError):
                client.send(b" ")


def answered_429(clients: list[socket.socket]) -> list[socket.socket]:
    """The clients nginx answered 429 within 5 s (the others it still reads from)."""
    answered = []
    with selectors.DefaultSelector() as selector:
        for client in clients:
            selector.register(client, selectors.EVENT_READ)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(answered) < len(clients):
            for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
                selector.unregister(key.fileobj)
                if key.fileobj.recv(64).startswith(b"HTTP/1.1 429"):  # type: ignore[union-attr]
                    answered.append(key.fileobj)
    return answered  # type: ignore[return-value]


def test_slow_clients_from_some_sources_do_not_hold_up_a_signed_push_from_another(
    hooks: Hooks,
) -> None:
    """Four sources each open more slow requests than they may hold: each keeps PER_SOURCE, the
    rest get 429 at once, and a signed push from a fifth source is answered within 5 s and
    delivered."""
    delivered_everything_before(hooks)
    sources = [f"127.0.0.{n}" for n in range(2, 6)]
    held = [client for source in sources for client in slow_clients(source, PER_SOURCE + 4)]
    stop = threading.Event()
    trickling = threading.Thread(target=trickle, args=(held, stop), daemon=True)
    trickling.start()
    try:
        assert len(answered_429(held)) == 4 * len(sources)
        component = f"past-slow-{secrets.token_hex(3)}"
        connection = http.client.HTTPConnection("127.0.0.1", 80, timeout=5)
        connection.sock = socket.create_connection(("127.0.0.1", 80), 5, ("127.0.0.9", 0))
        status, _ = hooks.post(TRIGGER, push(f"QubesOS/qubes-{component}"), connection)
        assert status == 202
    finally:
        stop.set()
        trickling.join()
        for client in held:
            client.close()
    assert wait_for(lambda: all(component in triggered(qube) for qube in BUILD_QUBES))
    lines = read(NET, f"{STATE}/services.log").splitlines()
    assert sum(f"source={source} route={TRIGGER} status=429" in line
               for source in sources for line in lines) >= 4 * len(sources)  # fmt: skip


def test_a_replayed_delivery_is_acted_on_once_and_the_genuine_path_still_works(
    hooks: Hooks,
) -> None:
    delivered_everything_before(hooks)
    command = SIGNED_COMMAND.replace("202611290800", str(secrets.randbelow(10**12)))
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = json.dumps({"action": "created", "issue": {"number": 7},
                       "comment": {"body": command, "created_at": created}}).encode()  # fmt: skip
    status, genuine = hooks.post(COMMENT, body, event="issue_comment")
    assert status == 202
    replays = [hooks.post(COMMENT, body, event="issue_comment") for _ in range(10)]
    replays.append(hooks.post(COMMENT, body, event="issue_comment", delivery=genuine))
    assert {status for status, _ in replays} == {200}
    # The same signed body as a push, and a push signed four days ago: refused.
    assert hooks.post(TRIGGER, body)[0] == 400
    stale = json.loads(push("QubesOS/qubes-stale"))
    stale["repository"]["pushed_at"] -= 4 * 86400
    assert hooks.post(TRIGGER, json.dumps(stale).encode())[0] == 400
    # Nested past 400 (signed): refused and logged.
    status, deep = hooks.post(TRIGGER, b"[" * 401 + b"]" * 401)
    assert status == 400
    delivered_everything_before(hooks)  # a genuine push after all that: accepted, delivered
    for qube in BUILD_QUBES:
        assert read(qube, COMMANDS).count(command) == 1, qube
    lines = log_lines()

    def decisions(delivery: str) -> list[str]:
        return [line.split("decision=")[1].split()[0] for line in lines
                if f"delivery={delivery} " in line]  # fmt: skip

    for _, delivery in replays[:-1]:
        assert decisions(delivery) == ["duplicate"], delivery
    # Accepted once, its redelivery a duplicate (besides the worker's delivery lines).
    assert [d for d in decisions(genuine) if d != "delivered"] == ["accepted", "duplicate"]
    [deep_line] = [line for line in lines if f"delivery={deep} " in line]
    assert "nests deeper than 400" in deep_line
