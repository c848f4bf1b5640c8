"""The webhooks role's receiver, spool and worker on temporary folders: real HTTP requests to the
WSGI application served by wsgiref (and once by gunicorn on a unix socket, as in the net qube)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest

from tests.utils import github_webhook

FILES = Path(__file__).resolve().parents[3] / "roles/webhooks/files"
sys.path.insert(0, str(FILES))

import webhook_receiver  # noqa: E402
import webhook_settings  # noqa: E402
import webhook_worker  # noqa: E402
from webhook_log import DecisionLog  # noqa: E402
from webhook_spool import Spool  # noqa: E402

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
        options.setdefault("delivery", "d-1")
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        return github_webhook.post(connection, route, body, secret=SECRET, **options)


def sign(body: bytes, secret: bytes = SECRET) -> str:
    return github_webhook.signature(secret, body)


def push(full_name: str) -> bytes:
    return json.dumps({"ref": "refs/tags/v1", "repository": {"full_name": full_name}}).encode()


def comment(body: str, action: str = "created") -> bytes:
    return json.dumps({"action": action, "comment": {"body": body}}).encode()


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
    ],
)
def test_a_repository_name_that_is_no_component_name_is_refused(
    place: Place, full_name: str
) -> None:
    status, text = place.post(TRIGGER, push(full_name))
    assert status == 400, text
    assert place.spooled() == []


def test_a_signed_body_nested_too_deep_is_refused_and_logged(place: Place) -> None:
    depth = 2_000  # within the test settings' 4096-byte body limit; Python stops at about 1,000
    status, text = place.post(TRIGGER, b"[" * depth + b"]" * depth)
    assert status == 400, text
    assert "nests too deeply" in place.log_lines()[-1]
    assert place.spooled() == []


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


# -- the worker's side of the spool ----------------------------------------------------------------
def test_an_event_taken_but_not_done_is_delivered_again_after_a_restart(place: Place) -> None:
    place.post(TRIGGER, push("QubesOS/qubes-a"), delivery="one")
    spool = Spool(str(place.spool), 50, 1 << 20)
    taken = spool.take()
    assert taken is not None and taken.content["component"] == "a"
    # A push arriving while the trigger is delivered is queued anew, not folded into it.
    assert place.post(TRIGGER, push("QubesOS/qubes-a"), delivery="two")[0] == 202
    restarted = Spool(str(place.spool), 50, 1 << 20)
    again = restarted.take()
    assert again is not None and again.content["delivery"] == "one"
    restarted.done(again)
    following = restarted.take()
    assert following is not None and following.content["delivery"] == "two"
    restarted.done(following)
    assert restarted.take() is None


@pytest.fixture
def recorder(tmp_path: Path) -> Path:
    """A stand-in for qrexec-client-vm, which exists only in a qube: it records its arguments
    and stdin; for the qube `slow` it hangs, `failing` fails, `flaky` is not reached the first
    time and `away` never."""
    script = tmp_path / "qrexec-client-vm"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {tmp_path}/calls\n'
        f"cat >> {tmp_path}/stdin\n"
        '[ "$2" != slow ] || exec sleep 60\n'
        '[ "$2" != failing ] || exit 3\n'
        f'[ "$2" != flaky ] || [ -e {tmp_path}/seen ] || {{ touch {tmp_path}/seen; exit 126; }}\n'
        '[ "$2" != away ] || exit 126\n'
    )
    script.chmod(0o755)
    return script


def test_the_worker_calls_every_listed_build_qube_with_a_deadline(
    place: Place, recorder: Path
) -> None:
    (place.root / "build-vms.list").write_text("build-fedora\nfailing\nslow\nnot a qube\n")
    place.post(TRIGGER, push("QubesOS/qubes-core-admin"), delivery="p1")
    place.post(COMMENT, comment(SIGNED_COMMAND), event="issue_comment", delivery="c1")
    raw = json.loads(place.settings_file.read_text())
    settings = webhook_settings.Settings(**{**raw, "qrexec_client": str(recorder),
                                            "call_timeout": 2})  # fmt: skip
    spool = Spool(settings.spool_directory, 50, 1 << 20)
    log = DecisionLog(settings.log_file, 1 << 20)
    started = time.monotonic()
    while webhook_worker.run_once(settings, spool, log):
        pass
    assert time.monotonic() - started < 30  # the slow call was cut at its deadline
    calls = (place.root / "calls").read_text().splitlines()
    # The qubes are called at once: in any order, but every trigger before the command.
    assert sorted(calls[:3]) + sorted(calls[3:]) == [
        f"-- {vm} qubesbuilder.TriggerBuild+core-admin"
        for vm in ("build-fedora", "failing", "slow")
    ] + [f"-- {vm} qubesbuilder.ProcessGithubCommand" for vm in ("build-fedora", "failing", "slow")]
    assert (place.root / "stdin").read_text() == (SIGNED_COMMAND + "\n") * 3
    delivered = [line for line in place.log_lines() if "decision=delivered" in line]
    assert "delivery=p1" in delivered[0] and "delivery=c1" in delivered[1]
    assert 'reason="build-fedora:0 failing:3 slow:timeout"' in delivered[0]
    assert any("invalid lines" in line for line in place.log_lines())
    assert place.spooled() == [] and list((place.spool / "active").iterdir()) == []


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
            str(FILES),
            "webhook_receiver:create_application()",
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


def test_a_call_that_did_not_reach_its_qube_is_made_again_to_that_qube_only(
    place: Place, recorder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhook_worker, "RETRY_SECONDS", 0)
    (place.root / "build-vms.list").write_text("build-fedora\nflaky\naway\n")
    place.post(TRIGGER, push("QubesOS/qubes-core-admin"), delivery="p1")
    raw = json.loads(place.settings_file.read_text())
    settings = webhook_settings.Settings(**{**raw, "qrexec_client": str(recorder)})
    spool = Spool(settings.spool_directory, 50, 1 << 20)
    log = DecisionLog(settings.log_file, 1 << 20)
    while webhook_worker.run_once(settings, spool, log):
        pass
    calls = [line.split()[1] for line in (place.root / "calls").read_text().splitlines()]
    attempts = webhook_worker.MAX_ATTEMPTS
    assert sorted(calls) == sorted(["build-fedora", "flaky", "flaky"] + ["away"] * attempts)
    decisions = [line.split("decision=")[1].split()[0] for line in place.log_lines()[1:]]
    assert decisions == ["retrying"] * (attempts - 1) + ["gave-up"]
    assert place.spooled() == [] and list((place.spool / "active").iterdir()) == []
