"""The webhooks role's receiver, spool and worker on temporary folders: real HTTP requests to the
WSGI application served by wsgiref (and once by gunicorn on a unix socket, as in the net qube)."""

from __future__ import annotations

import http.client
import io
import json
import multiprocessing
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest

from qubes_infra_services import (
    definitions,
    webhook_deliveries,
    webhook_receiver,
    webhook_settings,
    webhook_worker,
)
from qubes_infra_services.webhook_log import DecisionLog
from qubes_infra_services.webhook_spool import Spool
from tests.unit.services import RECEIVER_APPLICATION, SERVICES
from tests.utils import github_webhook

SECRET = b"a webhook secret for the tests"
SIGNED_COMMAND = (
    "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n"
    "Upload-component r4.2 core-admin 0123456789abcdef0123456789abcdef01234567 current "
    "vm-bookworm\n"
    "-----BEGIN PGP SIGNATURE-----\n\niHUEARYIAB0WIQ==\n=abcd\n-----END PGP SIGNATURE-----"
)


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Place:
    root: Path
    settings_file: Path
    port: int

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def log(self) -> Path:
        return self.root / "webhooks.log"

    def spooled(self) -> list[str]:
        return sorted(p.name for p in self.spool.iterdir() if p.is_file() and p.name[0] != ".")

    def log_lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def post(self, route: str, body: bytes, **options: str) -> tuple[int, str]:
        """A webhook signed with SECRET (options: event, delivery, signed)."""
        options.setdefault("delivery", str(uuid.uuid4()))
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        return github_webhook.post(connection, route, body, secret=SECRET, **options)


def sign(body: bytes, secret: bytes = SECRET) -> str:
    return github_webhook.signature(secret, body)


def push(full_name: str, **fields: object) -> bytes:
    """A push's body; each one differs (its `after`, as a new commit's), as GitHub's do."""
    payload = {"ref": "refs/tags/v1", "after": os.urandom(20).hex(), **fields,
               "repository": {"full_name": full_name}}  # fmt: skip
    return json.dumps(payload).encode()


def comment(body: str, action: str = "created", **fields: object) -> bytes:
    payload = {"action": action, "issue": {"number": int.from_bytes(os.urandom(3))},
               "comment": {"body": body, **fields}}  # fmt: skip
    return json.dumps(payload).encode()


TRIGGER = "/api/services/trigger_build"
COMMENT = "/api/services/process_comment"


def write_settings(root: Path, **overrides: object) -> Path:
    (root / "secret").write_bytes(SECRET + b"\n")
    settings = {
        "secret_file": str(root / "secret"),
        "max_body": 4096,
        "spool_directory": str(root / "spool"),
        "spool_max_events": 50,
        "spool_max_bytes": 1 << 20,
        "log_file": str(root / "webhooks.log"),
        "log_max_bytes": 1 << 20,
        "build_vms_list": str(root / "build-vms.list"),
        "call_timeout": 5,
        "max_command_bytes": 8192,
        **overrides,
    }
    path = root / "webhooks.json"
    path.write_text(json.dumps(settings))
    (root / "spool" / "active").mkdir(parents=True, exist_ok=True)
    return path


def serve(root: Path, **overrides: object) -> Iterator[Place]:
    settings_file = write_settings(root, **overrides)
    application = webhook_receiver.create_application(str(settings_file))
    server = make_server("127.0.0.1", 0, application, WSGIServer, QuietHandler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield Place(root, settings_file, server.server_port)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def place(tmp_path: Path) -> Iterator[Place]:
    yield from serve(tmp_path)


def test_a_signed_push_is_spooled_once_and_repeated_pushes_coalesce(place: Place) -> None:
    status, _ = place.post(TRIGGER, push("QubesOS/qubes-core-admin"), delivery="first")
    assert status == 202
    assert place.spooled() == ["trigger-core-admin"]
    stored = json.loads((place.spool / "trigger-core-admin").read_text())
    assert stored == {"kind": "trigger", "component": "core-admin", "delivery": "first"}
    status, _ = place.post(TRIGGER, push("QubesOS/qubes-core-admin"), delivery="second")
    assert status == 200
    assert place.spooled() == ["trigger-core-admin"]
    # Upstream's rule: without the `qubes-` prefix the repository name is the component.
    assert place.post(TRIGGER, push("fepitre/builder-rpm"))[0] == 202
    assert place.spooled() == ["trigger-builder-rpm", "trigger-core-admin"]
    decisions = [line.split(" decision=")[1].split()[0] for line in place.log_lines()]
    assert decisions == ["accepted", "coalesced", "accepted"]
    assert "delivery=second" in place.log_lines()[1]
    assert "component=core-admin" in place.log_lines()[1]


@pytest.mark.parametrize(
    "signature",
    [
        "",
        "sha256=" + "0" * 64,
        sign(push("QubesOS/qubes-other")),
        sign(b"x", b"another secret"),
        "sha1=" + "0" * 40,
        "sha256=\u00e9",
    ],
)
def test_a_missing_or_wrong_signature_is_forbidden_and_nothing_is_spooled(
    place: Place, signature: str
) -> None:
    status, _ = place.post(TRIGGER, push("QubesOS/qubes-core-admin"), signed=signature)
    assert status == 403
    assert place.spooled() == []
    assert "decision=refused" in place.log_lines()[0]


def test_a_signed_event_of_another_kind_is_answered_200_and_ignored(place: Place) -> None:
    for route, event in ((TRIGGER, "issues"), (TRIGGER, "ping"), (COMMENT, "push")):
        status, _ = place.post(route, push("QubesOS/qubes-core-admin"), event=event)
        assert status == 200
    assert place.spooled() == []
    assert all("decision=ignored" in line for line in place.log_lines())


def test_an_oversized_body_is_refused_413(place: Place) -> None:
    body = push("QubesOS/qubes-" + "a" * 10) + b" " * 5000
    status, _ = place.post(TRIGGER, body)
    assert status == 413
    assert place.spooled() == []


def test_malformed_json_is_refused_400(place: Place) -> None:
    for body in (b"{not json", b"[1, 2]", b"\xff\xfe", b'{"repository": {"full_name": 3}}'):
        assert place.post(TRIGGER, body)[0] == 400
    body = b'{"action": "created", "comment": 1}'
    assert place.post(COMMENT, body, event="issue_comment")[0] == 400
    assert place.spooled() == []


@pytest.mark.parametrize(
    "full_name",
    [
        "QubesOS/qubes-core.admin",
        "QubesOS/qubes-core admin",
        "QubesOS/qubes-a/b",
        "QubesOS/..",
        "QubesOS/qubes-" + "a" * 65,
        "no-owner",
        "QubesOS/qubes-",
        "QubesOS/core\nadmin",
        "QubesOS/qubes-core-admin\n",
        # A leading '-' would reach the build qube's programs as an option.
        "QubesOS/qubes--help",
        "QubesOS/-x",
    ],
)
def test_a_repository_name_that_is_no_component_name_is_refused(
    place: Place, full_name: str
) -> None:
    status, text = place.post(TRIGGER, push(full_name))
    assert status == 400, text
    assert place.spooled() == []


def nested_push(depth: int, opening: str = "[", closing: str = "]") -> bytes:
    """A push whose JSON nests depth deep (the top object counts as 1)."""
    inner = opening * (depth - 1) + closing * (depth - 1)
    if opening == "{":
        inner = '{"a":' * (depth - 1) + "1" + "}" * (depth - 1)
    return push("QubesOS/qubes-deep")[:-1] + f', "deep": {inner}}}'.encode()


@pytest.mark.parametrize("opening, closing", [("[", "]"), ("{", "}")])
def test_json_nested_deeper_than_400_is_refused_and_logged_and_400_deep_is_read(
    tmp_path: Path, opening: str, closing: str
) -> None:
    for place in serve(tmp_path, max_body=65536):
        for depth in (401, 5_000):
            status, text = place.post(TRIGGER, nested_push(depth, opening, closing))
            assert status == 400, text
            assert 'reason="the body\'s JSON nests deeper than 400"' in place.log_lines()[-1]
        assert place.spooled() == []
        status, text = place.post(TRIGGER, nested_push(400, opening, closing))
        assert status == 202, text
        assert place.spooled() == ["trigger-deep"]


def test_brackets_inside_json_strings_do_not_count_as_nesting(place: Place) -> None:
    body = push("QubesOS/qubes-strings", message='[{ \\" ' * 450)
    assert place.post(TRIGGER, body)[0] == 202


def test_a_component_of_64_characters_is_accepted(place: Place) -> None:
    assert place.post(TRIGGER, push("QubesOS/qubes-" + "a" * 64))[0] == 202
    assert place.spooled() == ["trigger-" + "a" * 64]


def test_the_signed_command_is_cut_from_the_comment_as_builder_github_does(place: Place) -> None:
    # Upstream (qubes-builder-github, the webhook's process_comment): trailing blanks removed,
    # from the signed-message header to the end of the signature, plus a final newline.
    text = "Please upload:\r\n\r\n" + SIGNED_COMMAND.replace("\n", "  \r\n") + "\r\nthanks\n"
    assert place.post(COMMENT, comment(text), event="issue_comment")[0] == 202
    [name] = place.spooled()
    stored = json.loads((place.spool / name).read_text())
    assert stored["kind"] == "command"
    assert stored["command"] == SIGNED_COMMAND + "\n"


@pytest.mark.parametrize(
    "body, action",
    [
        ("just a comment", "created"),
        (SIGNED_COMMAND, "edited"),
        (SIGNED_COMMAND.replace("Upload", "Uplöad"), "created"),
        (SIGNED_COMMAND.split("-----END")[0], "created"),
    ],
)
def test_comments_without_a_usable_signed_command_are_ignored(
    place: Place, body: str, action: str
) -> None:
    assert place.post(COMMENT, comment(body, action), event="issue_comment")[0] == 200
    assert place.spooled() == []


def test_unknown_routes_and_methods(place: Place) -> None:
    assert place.post("/api/services/other", push("QubesOS/qubes-a"))[0] == 404
    connection = http.client.HTTPConnection("127.0.0.1", place.port, timeout=30)
    connection.request("GET", TRIGGER)
    assert connection.getresponse().status == 405
    connection.close()


def test_a_full_spool_answers_503_and_keeps_what_it_holds(tmp_path: Path) -> None:
    for place in serve(tmp_path, spool_max_events=2):
        assert place.post(TRIGGER, push("QubesOS/qubes-a"))[0] == 202
        assert place.post(TRIGGER, push("QubesOS/qubes-b"))[0] == 202
        assert place.post(TRIGGER, push("QubesOS/qubes-c"))[0] == 503
        # A pending component still coalesces: it needs no room.
        assert place.post(TRIGGER, push("QubesOS/qubes-a"))[0] == 200
        assert place.spooled() == ["trigger-a", "trigger-b"]


def test_the_log_has_one_line_per_request_and_stays_bounded(tmp_path: Path) -> None:
    for place in serve(tmp_path, log_max_bytes=2000):
        forged = "x FAKE decision=accepted " + "y" * 300
        place.post(TRIGGER, push("QubesOS/qubes-a"), delivery=forged, signed="bad")
        lines = place.log_lines()
        assert len(lines) == 1 and "FAKE decision" not in lines[0] and len(lines[0]) < 400
        for number in range(40):
            place.post(TRIGGER, push(f"QubesOS/qubes-c{number}"))
        assert place.log.stat().st_size <= 2000
        assert (place.root / "webhooks.log.1").stat().st_size <= 2000
        assert "component=c39" in place.log_lines()[-1]


def test_the_receiver_refuses_to_start_without_a_secret_or_with_a_body_limit_over_25_mb(
    tmp_path: Path,
) -> None:
    settings = write_settings(tmp_path)
    (tmp_path / "secret").write_text("\n")
    with pytest.raises(ValueError, match="secret is empty"):
        webhook_receiver.create_application(str(settings))
    with pytest.raises(ValueError, match="max_body"):
        webhook_settings.load(str(write_settings(tmp_path, max_body=25_000_001)))


# -- served as in the net qube ---------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("gunicorn") is None, reason="needs gunicorn")
def test_gunicorn_serves_the_receiver_on_a_unix_socket(tmp_path: Path) -> None:
    settings = write_settings(tmp_path)
    address = tmp_path / "receiver.sock"
    server = subprocess.Popen(
        [
            "gunicorn",
            "--bind",
            f"unix:{address}",
            "--workers",
            "2",
            "--chdir",
            str(SERVICES),
            RECEIVER_APPLICATION,
        ],
        env={**os.environ, "WEBHOOKS_SETTINGS": str(settings)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not address.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        statuses = []
        for body, signature in ((push("QubesOS/qubes-a"), None), (push("QubesOS/qubes-b"), "x")):
            with socket.socket(socket.AF_UNIX) as unix:
                unix.connect(str(address))
                connection = http.client.HTTPConnection("localhost")
                connection.sock = unix
                headers = {"X-GitHub-Event": "push", "X-Hub-Signature-256": signature or sign(body)}
                connection.request("POST", TRIGGER, body=body, headers=headers)
                statuses.append(connection.getresponse().status)
        assert statuses == [202, 403]
        assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == [
            ".lock", "active", "trigger-a"]  # fmt: skip
    finally:
        server.terminate()
        server.wait(30)


# -- delivery: one qube's slowness costs the others nothing ---------------------------------------
# A stand-in for qrexec-client-vm, which exists only in a qube, keeping upstream's contract
# (core-qrexec agent/qrexec-client-vm.c, main()): a refused call exits 126 with "Request refused"
# and never starts LOCAL_PROGRAM; an allowed one starts it (stdin and stdout: the service's
# stdout and stdin; ours as SAVED_FD_0 and SAVED_FD_1) and exits with the service's code, or the
# local program's when the service's is 0. The "service" is played here, by the qube's name:
# `refusing` is always refused, `flaky` the first time; `hanging` waits while the file `gate`
# exists; `exit126` exits 126 itself after writing "Request refused" to stderr, `failing` 3.
FAKE_QREXEC_CLIENT = """\
#!{python}
import os, subprocess, sys, time
place = {place!r}
assert sys.argv[1] == "--"
vm, service, program = sys.argv[2], sys.argv[3], sys.argv[4:]
with open(os.path.join(place, "calls"), "a") as calls:
    calls.write(f"{{vm}} {{service}} {{os.getpid()}}\\n")
refused = vm == "refusing" or vm == "slow-refusal"
if vm == "flaky" and not os.path.exists(os.path.join(place, "flaky-seen")):
    open(os.path.join(place, "flaky-seen"), "w").close()
    refused = True
if vm == "slow-refusal":
    time.sleep(60)
if refused:
    sys.stderr.write("Request refused\\n")
    sys.exit(126)
saved = os.dup(0), os.dup(1)
local = subprocess.Popen(program, stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=saved,
                         env=dict(os.environ, SAVED_FD_0=str(saved[0]), SAVED_FD_1=str(saved[1])))
local.stdin.close()
received = local.stdout.read()
local_code = local.wait()
with open(os.path.join(place, "stdin-" + vm), "ab") as stored:
    stored.write(received)
while vm == "hanging" and os.path.exists(os.path.join(place, "gate")):
    time.sleep(0.05)
if vm == "exit126":
    sys.stderr.write("Request refused\\n")
remote_code = {{"exit126": 126, "failing": 3}}.get(vm, 0)
sys.exit(remote_code or local_code)
"""


@pytest.fixture
def fake_qrexec(tmp_path: Path) -> Path:
    script = tmp_path / "qrexec-client-vm"
    script.write_text(FAKE_QREXEC_CLIENT.format(python=sys.executable, place=str(tmp_path)))
    script.chmod(0o755)
    return script


def worker_settings(place: Place, client: Path, **overrides: object) -> webhook_settings.Settings:
    raw = json.loads(place.settings_file.read_text())
    return webhook_settings.Settings(**{**raw, "qrexec_client": str(client), **overrides})


def calls_of(place: Place) -> list[tuple[str, str]]:
    """(qube, service) of each call the stand-in got, in order."""
    try:
        lines = (place.root / "calls").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [(line.split()[0], line.split()[1]) for line in lines]


def deliveries(place: Place, qube: str) -> list[tuple[str, str]]:
    """(delivery, decision) of the worker's lines about calls to qube."""
    found = []
    for line in place.log_lines():
        if "worker=delivery" in line and f" qube={qube} " in line:
            found.append(
                (line.split(" delivery=")[1].split()[0], line.split("decision=")[1].split()[0])
            )
    return found


def in_process(
    place: Place, client: Path, vms: list[str], **overrides: object
) -> webhook_worker.Worker:
    """A worker whose fan-out and deliveries the test drives itself (no threads)."""
    settings = worker_settings(place, client, **overrides)
    spool = Spool(settings.spool_directory, settings.spool_max_events, settings.spool_max_bytes)
    spool.prepare()
    worker = webhook_worker.Worker(settings, spool, DecisionLog(settings.log_file, 1 << 20))
    for vm in vms:
        worker.deliveries[vm] = webhook_worker.QubeDelivery(
            settings, vm, worker.queue(vm), worker.log, worker.stopping, worker.running
        )
    return worker


def drain(worker: webhook_worker.Worker) -> None:
    worker.fan_out(list(worker.deliveries))
    for delivery in worker.deliveries.values():
        while delivery.step():
            pass


def test_each_listed_build_qube_gets_each_event_in_order_with_a_deadline(
    place: Place, fake_qrexec: Path
) -> None:
    (place.root / "build-vms.list").write_text("build-fedora\nfailing\nhanging\nnot a qube\n")
    (place.root / "gate").touch()
    place.post(TRIGGER, push("QubesOS/qubes-core-admin"), delivery="p1")
    place.post(COMMENT, comment(SIGNED_COMMAND), event="issue_comment", delivery="c1")
    settings = worker_settings(place, fake_qrexec, call_timeout=2)
    log = DecisionLog(settings.log_file, 1 << 20)
    vms = webhook_worker.build_vms(settings.build_vms_list, log)
    assert vms == ["build-fedora", "failing", "hanging"]
    assert any("invalid lines" in line for line in place.log_lines())
    worker = in_process(place, fake_qrexec, vms, call_timeout=2)
    started = time.monotonic()
    drain(worker)
    assert time.monotonic() - started < 30  # the hanging calls were cut at their deadline
    services = ["qubesbuilder.TriggerBuild+core-admin", "qubesbuilder.ProcessGithubCommand"]
    for vm in vms:
        assert [service for qube, service in calls_of(place) if qube == vm] == services
        assert (place.root / f"stdin-{vm}").read_text() == SIGNED_COMMAND + "\n"
        assert deliveries(place, vm) == [("p1", "delivered"), ("c1", "delivered")]
    codes = [line.split('reason="')[1].split('"')[0] for line in place.log_lines()
             if "worker=delivery" in line and "delivery=p1" in line]  # fmt: skip
    assert sorted(codes) == ["build-fedora:0", "failing:3", "hanging:timeout"]
    assert place.spooled() == []
    assert all(worker.queue(vm).pending() == [] for vm in vms)
    assert all(list(Path(worker.queue(vm).active).iterdir()) == [] for vm in vms)


def test_only_a_call_that_never_reached_its_qube_is_made_again_with_backoff(
    place: Place, fake_qrexec: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    waits: list[float] = []
    monkeypatch.setattr(webhook_worker, "RETRY_SECONDS", 0.01)
    worker = in_process(place, fake_qrexec, ["build-fedora", "flaky", "refusing", "exit126"])
    real_wait = worker.stopping.wait
    monkeypatch.setattr(worker.stopping, "wait", lambda s: waits.append(s) or real_wait(s))
    place.post(TRIGGER, push("QubesOS/qubes-core-admin"), delivery="p1")
    drain(worker)
    calls = [qube for qube, _ in calls_of(place)]
    attempts = webhook_worker.MAX_ATTEMPTS
    # The service's own 126 (exit126) reached its qube: called once, as build-fedora.
    assert sorted(calls) == sorted(["build-fedora", "exit126", "flaky", "flaky"]
                                   + ["refusing"] * attempts)  # fmt: skip
    assert deliveries(place, "exit126") == [("p1", "delivered")]
    assert deliveries(place, "flaky") == [("p1", "retrying"), ("p1", "delivered")]
    assert deliveries(place, "refusing") == [("p1", "retrying")] * (attempts - 1) + [
        ("p1", "gave-up")
    ]
    # Waits double, per qube: 1 for flaky; 1, 2, 4, 8, 16 (times the unit) for refusing.
    assert sorted(waits) == sorted([0.01] + [0.01 * 2**n for n in range(attempts - 1)])
    assert place.spooled() == []


def test_a_missing_qrexec_client_counts_as_a_refusal(
    place: Place, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhook_worker, "RETRY_SECONDS", 0.01)
    worker = in_process(place, tmp_path / "no-such-client", ["build-fedora"])
    place.post(TRIGGER, push("QubesOS/qubes-core-admin"), delivery="p1")
    drain(worker)
    attempts = webhook_worker.MAX_ATTEMPTS
    assert deliveries(place, "build-fedora") == [("p1", "retrying")] * (attempts - 1) + [
        ("p1", "gave-up")
    ]
    assert 'reason="build-fedora:error (did not reach the qube)"' in place.log_lines()[-1]


def test_a_call_cut_at_its_deadline_is_not_made_again_even_if_it_never_reached(
    place: Place, fake_qrexec: Path
) -> None:
    (place.root / "gate").touch()
    worker = in_process(place, fake_qrexec, ["hanging", "slow-refusal"], call_timeout=1)
    place.post(TRIGGER, push("QubesOS/qubes-core-admin"), delivery="p1")
    drain(worker)
    assert sorted(qube for qube, _ in calls_of(place)) == ["hanging", "slow-refusal"]
    assert deliveries(place, "hanging") == [("p1", "delivered")]
    assert deliveries(place, "slow-refusal") == [("p1", "gave-up")]
    assert any('reason="slow-refusal:timeout (did not reach the qube)"' in line
               for line in place.log_lines())  # fmt: skip


def test_a_trigger_pending_for_one_qube_takes_a_new_push_in_while_the_others_get_it_again(
    place: Place, fake_qrexec: Path
) -> None:
    worker = in_process(place, fake_qrexec, ["build-fedora", "hanging"])
    place.post(TRIGGER, push("QubesOS/qubes-core-admin"), delivery="p1")
    worker.fan_out(["build-fedora", "hanging"])
    assert worker.deliveries["build-fedora"].step()
    assert place.post(TRIGGER, push("QubesOS/qubes-core-admin"), delivery="p2")[0] == 202
    worker.fan_out(["build-fedora", "hanging"])
    assert worker.queue("hanging").pending() == ["trigger-core-admin"]
    drain(worker)
    assert deliveries(place, "build-fedora") == [("p1", "delivered"), ("p2", "delivered")]
    assert deliveries(place, "hanging") == [("p1", "delivered")]  # p2 folded into p1
    [folded] = [line for line in place.log_lines() if "decision=coalesced" in line]
    assert "worker=queue qube=hanging delivery=p2 component=core-admin" in folded


def test_a_full_queue_drops_its_own_oldest_event_and_logs_it(
    place: Place, fake_qrexec: Path
) -> None:
    worker = in_process(place, fake_qrexec, ["build-fedora", "hanging"], queue_max_events=3)
    for number in range(5):
        place.post(COMMENT, comment(SIGNED_COMMAND), event="issue_comment", delivery=f"c{number}")
        time.sleep(0.01)  # distinct write times: the queue's order
        worker.fan_out(["build-fedora", "hanging"])
        assert worker.deliveries["build-fedora"].step()  # build-fedora keeps up
    assert len(worker.queue("hanging").pending()) == 3
    assert place.spooled() == []
    dropped = [line for line in place.log_lines() if "decision=dropped" in line]
    assert [line.split(" delivery=")[1].split()[0] for line in dropped] == ["c0", "c1"]
    assert all(" qube=hanging " in line for line in dropped)
    drain(worker)
    assert [d for d, _ in deliveries(place, "hanging")] == ["c2", "c3", "c4"]
    assert [d for d, _ in deliveries(place, "build-fedora")] == [f"c{n}" for n in range(5)]


def test_an_interrupted_delivery_is_made_again_after_a_restart(
    place: Place, fake_qrexec: Path
) -> None:
    worker = in_process(place, fake_qrexec, ["build-fedora"])
    place.post(TRIGGER, push("QubesOS/qubes-a"), delivery="one")
    worker.fan_out(["build-fedora"])
    taken = worker.queue("build-fedora").take()
    assert taken is not None and taken.content["delivery"] == "one"
    # A push arriving while the trigger is delivered is queued anew, not folded into it.
    assert place.post(TRIGGER, push("QubesOS/qubes-a"), delivery="two")[0] == 202
    worker.fan_out(["build-fedora"])
    # An event of an earlier worker, which delivered one event to every qube at once.
    (place.spool / "active" / "trigger-b").write_text(
        json.dumps({"kind": "trigger", "component": "b", "delivery": "legacy"})
    )
    restarted = in_process(place, fake_qrexec, ["build-fedora"])
    drain(restarted)
    assert [d for d, _ in deliveries(place, "build-fedora")] == ["one", "two", "legacy"]


def test_events_that_are_not_the_receivers_or_names_with_a_newline_are_dropped(
    place: Place, fake_qrexec: Path
) -> None:
    assert not definitions.is_qube_name("build-fedora\n")
    assert not webhook_worker.well_formed({"kind": "trigger", "component": "core\n"}, 8192)
    assert not webhook_worker.well_formed({"kind": "trigger", "component": "-x"}, 8192)
    assert not webhook_worker.well_formed({"kind": "command", "command": "x" * 8193}, 8192)
    (place.spool / "trigger-a").write_text(json.dumps({"kind": "trigger", "component": "a\n"}))
    (place.spool / "command-1").write_text("[]")
    worker = in_process(place, fake_qrexec, ["build-fedora"])
    drain(worker)
    assert calls_of(place) == [] and place.spooled() == []
    assert sum("decision=dropped" in line for line in place.log_lines()) == 2


def test_the_queue_of_a_qube_no_longer_listed_goes(place: Place, fake_qrexec: Path) -> None:
    worker = in_process(place, fake_qrexec, [])
    place.post(TRIGGER, push("QubesOS/qubes-a"), delivery="p1")
    worker.fan_out(["build-fedora", "old"])
    try:
        worker.tend(["build-fedora"])
        assert not (place.spool / "queues" / "old").exists()
        assert wait_until(lambda: deliveries(place, "build-fedora") == [("p1", "delivered")])
    finally:
        worker.stop()
    [line] = [line for line in place.log_lines() if "qube=old" in line]
    assert "delivery=p1" in line and "decision=dropped" in line


def wait_until(condition: Callable[[], bool], seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def start_worker(place: Place) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(SERVICES / "webhook_worker.py")],
        env={**os.environ, "WEBHOOKS_SETTINGS": str(place.settings_file)},
    )


def test_a_hanging_qube_delays_no_other_and_its_backlog_never_makes_github_get_503(
    tmp_path: Path, fake_qrexec: Path
) -> None:
    """The worker as in the net qube, a process of its own: with `hanging` stuck in its first
    call, build-fedora gets every event at once, hanging's queue stays within its bound, and
    the receiver's part of the spool (4 events here) never fills: every webhook gets 202."""
    for place in serve(tmp_path, spool_max_events=4, queue_max_events=3, call_timeout=120,
                       qrexec_client=str(fake_qrexec)):  # fmt: skip
        (place.root / "build-vms.list").write_text("build-fedora\nhanging\n")
        (place.root / "gate").touch()
        worker = start_worker(place)
        try:
            worker = hang_then_crash_then_recover(place, worker)
        finally:
            worker.terminate()
            worker.wait(30)


def hang_then_crash_then_recover(
    place: Place, worker: subprocess.Popen[bytes]
) -> subprocess.Popen[bytes]:
    sent = [f"d{number}" for number in range(12)]
    for number, delivery in enumerate(sent):
        status, _ = place.post(TRIGGER, push(f"QubesOS/qubes-c{number}"), delivery=delivery)
        assert status == 202, delivery
        time.sleep(0.3)  # GitHub's pace at worst: a push every 0.3 s

    def delivered(qube: str) -> list[str]:
        return [delivery for delivery, _ in deliveries(place, qube)]

    assert wait_until(lambda: delivered("build-fedora") == sent, seconds=20)
    hanging = Spool(str(place.spool), 4, 1 << 20).queue("hanging", 3)
    assert [qube for qube, _ in calls_of(place)].count("hanging") == 1
    assert hanging.pending() == ["trigger-c9", "trigger-c10", "trigger-c11"]
    assert os.listdir(hanging.active) == ["trigger-c0"]
    dropped = [line.split(" delivery=")[1].split()[0] for line in place.log_lines()
               if "decision=dropped" in line and " qube=hanging " in line]  # fmt: skip
    assert dropped == sent[1:9]
    assert place.spooled() == []
    # Killed as by a crash, with hanging's call in progress (and left behind).
    worker.kill()
    worker.wait()
    calls = (place.root / "calls").read_text().splitlines()
    [stuck] = [line.split()[2] for line in calls if line.startswith("hanging ")]
    os.kill(int(stuck), signal.SIGKILL)
    (place.root / "gate").unlink()
    worker = start_worker(place)
    wanted = ["d0", "d9", "d10", "d11"]  # the interrupted call first, then the queue
    assert wait_until(lambda: delivered("hanging") == wanted)
    assert delivered("build-fedora") == sent
    return worker


def test_eight_qubes_delivered_at_once_each_get_every_event_once_in_order(
    tmp_path: Path, fake_qrexec: Path
) -> None:
    """The threads of the qubes share a process (descriptors, the log): no call of one may
    disturb another's."""
    qubes = [f"q{number}" for number in range(8)]
    sent = [f"c{number}" for number in range(15)]
    for place in serve(tmp_path, qrexec_client=str(fake_qrexec)):
        (place.root / "build-vms.list").write_text("\n".join(qubes) + "\n")
        worker = start_worker(place)
        try:
            for delivery in sent:
                place.post(COMMENT, comment(SIGNED_COMMAND), event="issue_comment",
                           delivery=delivery)  # fmt: skip
                time.sleep(0.01)  # distinct write times: the queues' order
            assert wait_until(lambda place=place: each_got(place, qubes, sent))
        finally:
            worker.terminate()
            worker.wait(30)
        assert len(calls_of(place)) == len(qubes) * len(sent)


def each_got(place: Place, qubes: list[str], sent: list[str]) -> bool:
    wanted = [(delivery, "delivered") for delivery in sent]
    return all(deliveries(place, qube) == wanted for qube in qubes)


def test_the_attempts_of_one_call_stay_within_the_call_timeout_together(
    place: Place, fake_qrexec: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhook_worker, "RETRY_SECONDS", 0.4)  # waits 0.4, 0.8, 1.6 s...
    worker = in_process(place, fake_qrexec, ["refusing"], call_timeout=2)
    place.post(TRIGGER, push("QubesOS/qubes-core-admin"), delivery="p1")
    started = time.monotonic()
    drain(worker)
    assert time.monotonic() - started < 2
    decisions = [decision for _, decision in deliveries(place, "refusing")]
    assert len(decisions) < webhook_worker.MAX_ATTEMPTS and decisions[-1] == "gave-up"
    assert set(decisions[:-1]) == {"retrying"}


# -- a delivery is acted on once -------------------------------------------------------------------
WINDOW = 259200  # the settings' default replay window, in seconds


def decisions_of(place: Place) -> list[str]:
    return [line.split(" decision=")[1].split()[0] for line in place.log_lines()]


def test_a_replayed_body_or_delivery_id_is_answered_200_once_logged_and_not_spooled(
    place: Place,
) -> None:
    body = push("QubesOS/qubes-core-admin")
    assert place.post(TRIGGER, body, delivery="genuine")[0] == 202
    replays = [
        place.post(TRIGGER, body, delivery=f"forged-{n}", event=event)[0]
        for n, event in enumerate(["push", "push", "push"])
    ]
    # The same delivery id with another (signed) body: GitHub's redelivery of an accepted one.
    replays.append(place.post(TRIGGER, push("QubesOS/qubes-other"), delivery="genuine")[0])
    assert replays == [200] * 4
    assert place.spooled() == ["trigger-core-admin"]
    assert decisions_of(place) == ["accepted"] + ["duplicate"] * 4
    assert all('reason="this delivery or body was accepted before"' in line
               for line in place.log_lines()[1:])  # fmt: skip


def test_a_replayed_comment_after_its_delivery_is_still_a_duplicate(place: Place) -> None:
    body = comment(SIGNED_COMMAND)
    assert place.post(COMMENT, body, event="issue_comment")[0] == 202
    [name] = place.spooled()
    (place.spool / name).unlink()  # delivered: the spool no longer has it
    statuses = {place.post(COMMENT, body, event="issue_comment")[0] for _ in range(20)}
    assert statuses == {200}
    assert place.spooled() == []
    assert decisions_of(place) == ["accepted"] + ["duplicate"] * 20


def test_the_memory_of_deliveries_survives_a_restart(tmp_path: Path) -> None:
    body = push("QubesOS/qubes-a")
    for place in serve(tmp_path):
        assert place.post(TRIGGER, body)[0] == 202
        (place.spool / "trigger-a").unlink()
    for place in serve(tmp_path):
        assert place.post(TRIGGER, body)[0] == 200
        assert place.spooled() == []


def test_a_delivery_refused_for_a_full_spool_is_accepted_when_github_sends_it_again(
    tmp_path: Path,
) -> None:
    for place in serve(tmp_path, spool_max_events=1):
        assert place.post(TRIGGER, push("QubesOS/qubes-a"))[0] == 202
        body = push("QubesOS/qubes-b")
        assert place.post(TRIGGER, body, delivery="redelivered")[0] == 503
        (place.spool / "trigger-a").unlink()
        assert place.post(TRIGGER, body, delivery="redelivered")[0] == 202
        assert place.spooled() == ["trigger-b"]


def test_the_same_body_sent_at_once_to_two_receiver_processes_is_accepted_once(
    tmp_path: Path,
) -> None:
    settings = write_settings(tmp_path)
    receivers = [webhook_receiver.create_application(str(settings)) for _ in range(2)]
    body = push("QubesOS/qubes-raced")
    start = threading.Barrier(8)
    statuses: list[str] = []

    def send(receiver: webhook_receiver.Receiver) -> None:
        environ = {"REQUEST_METHOD": "POST", "PATH_INFO": TRIGGER, "CONTENT_LENGTH": str(len(body)),
                   "wsgi.input": io.BytesIO(body), "HTTP_X_GITHUB_EVENT": "push",
                   "HTTP_X_HUB_SIGNATURE_256": sign(body),
                   "HTTP_X_GITHUB_DELIVERY": str(uuid.uuid4())}  # fmt: skip
        start.wait()
        receiver(environ, lambda status, headers: statuses.append(status))

    threads = [threading.Thread(target=send, args=(receivers[n % 2],)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == ["200 OK"] * 7 + ["202 Accepted"], statuses


def remember_once(path: str, start: float, name: str) -> str:
    """One receiver process's first delivery: it opens the memory when the others do."""
    deliveries = webhook_deliveries.Deliveries(path, window=600, max_entries=100)
    time.sleep(max(0.0, start - time.time()))
    try:
        deliveries.once("same body", name, None, lambda: (True, "accepted"))
    except webhook_deliveries.Duplicate:
        return "duplicate"
    except sqlite3.Error as error:
        return f"failed: {error}"
    return "accepted"


def test_processes_opening_a_new_memory_at_once_all_get_an_answer(tmp_path: Path) -> None:
    # SQLite's switch to WAL does not wait on the busy timeout: without opening one at a time,
    # some of gunicorn's workers would answer their first delivery with 503.
    context = multiprocessing.get_context("fork")
    for round_ in range(10):
        start = time.time() + 0.3
        path = str(tmp_path / f"deliveries-{round_}.sqlite")
        with context.Pool(8) as pool:
            answers = pool.starmap(remember_once, [(path, start, str(n)) for n in range(8)])
        assert sorted(answers) == ["accepted"] + ["duplicate"] * 7, answers


def timed_push(name: str, pushed_at: object) -> bytes:
    payload = {"ref": "refs/heads/main", "after": os.urandom(20).hex(),
               "repository": {"full_name": name, "pushed_at": pushed_at}}  # fmt: skip
    return json.dumps(payload).encode()


def iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def test_a_body_signed_longer_ago_than_the_window_or_in_the_future_is_refused(
    place: Place,
) -> None:
    now = time.time()
    refused = {
        "push, old": place.post(TRIGGER, timed_push("QubesOS/qubes-a", int(now) - WINDOW - 60)),
        "push, future": place.post(TRIGGER, timed_push("QubesOS/qubes-a", int(now) + 3600)),
        "push, not a time": place.post(TRIGGER, timed_push("QubesOS/qubes-a", "yesterday")),
        "push, no zone": place.post(TRIGGER, timed_push("QubesOS/qubes-a", "2026-01-01T00:00")),
        "comment, old": place.post(
            COMMENT, comment(SIGNED_COMMAND, created_at=iso(now - WINDOW - 60)),
            event="issue_comment"),
    }  # fmt: skip
    assert {name: status for name, (status, _) in refused.items()} == dict.fromkeys(refused, 400)
    assert place.spooled() == []
    reasons = [line.split("reason=")[1] for line in place.log_lines()]
    assert sum("too old: signed" in reason for reason in reasons) == 3
    assert sum("repository.pushed_at is not a time" in reason for reason in reasons) == 2
    # Within the window (GitHub's times: a push's epoch seconds, a comment's ISO 8601).
    assert place.post(TRIGGER, timed_push("QubesOS/qubes-a", int(now) - WINDOW + 60))[0] == 202
    fresh = comment(SIGNED_COMMAND, created_at=time.strftime("%Y-%m-%dT%H:%M:%S+00:00"))
    assert place.post(COMMENT, fresh, event="issue_comment")[0] == 202


@pytest.mark.parametrize(
    "route, event, payload",
    [
        # Another event's body under the route's event name (the header is not signed).
        (TRIGGER, "push", {"action": "created", "issue": {}, "comment": {"body": "x"},
                           "repository": {"full_name": "QubesOS/qubes-a"}}),
        (TRIGGER, "push", {"ref": "v1", "ref_type": "tag",
                           "repository": {"full_name": "QubesOS/qubes-a"}}),
        (TRIGGER, "push", {"ref": "refs/heads/main", "action": "opened",
                           "repository": {"full_name": "QubesOS/qubes-a"}}),
        (TRIGGER, "push", {"repository": {"full_name": "QubesOS/qubes-a"}}),
        (COMMENT, "issue_comment", {"ref": "refs/heads/main", "comment": {"body": SIGNED_COMMAND}}),
        (COMMENT, "issue_comment", {"action": "created", "pull_request": {},
                                    "comment": {"body": SIGNED_COMMAND}}),
        (COMMENT, "issue_comment", {"action": "created", "comment": {"body": SIGNED_COMMAND,
                                                                     "commit_id": "0" * 40}}),
    ],
)  # fmt: skip
def test_a_body_whose_shape_is_not_the_routes_event_is_refused(
    place: Place, route: str, event: str, payload: dict[str, object]
) -> None:
    status, text = place.post(route, json.dumps(payload).encode(), event=event)
    assert status == 400, text
    assert f"is not that of a {event} event" in place.log_lines()[-1]
    assert place.spooled() == []


def test_past_its_space_bound_the_memory_refuses_what_it_forgot_if_the_body_has_a_time(
    tmp_path: Path,
) -> None:
    for place in serve(tmp_path, deliveries_max=3):
        now = int(time.time())
        timed = timed_push("QubesOS/qubes-t0", now - 5)
        untimed = push("QubesOS/qubes-u0")
        assert place.post(TRIGGER, timed)[0] == 202
        assert place.post(TRIGGER, untimed)[0] == 202
        for number in range(1, 4):
            assert place.post(TRIGGER, timed_push(f"QubesOS/qubes-t{number}", now))[0] == 202
        database = sqlite3.connect(place.root / "deliveries.sqlite")
        assert database.execute("SELECT COUNT(*) FROM seen").fetchone() == (3,)
        database.close()
        for name in place.spooled():
            (place.spool / name).unlink()
        status, text = place.post(TRIGGER, timed)
        assert status == 400 and "signed before the oldest delivery still remembered" in text
        # GitHub never sends a push without its time: such a body, forgotten, is accepted again.
        assert place.post(TRIGGER, untimed)[0] == 202


def test_a_broken_memory_of_deliveries_answers_503_logged_and_acts_on_nothing(
    place: Place,
) -> None:
    (place.root / "deliveries.sqlite").write_bytes(b"not a database" * 100)
    status, text = place.post(TRIGGER, push("QubesOS/qubes-a"))
    assert status == 503, text
    assert "the memory of deliveries failed" in place.log_lines()[-1]
    assert place.spooled() == []
