"""The webhooks role's listener: nginx run here with the configuration the role renders, in front
of the real receiver under gunicorn, reached from several loopback source addresses (127.0.0.2,
127.0.0.3...: each is a source of its own to nginx's limits)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.unit.roles.rendering import render_template
from tests.unit.roles.test_webhook_units import VALUES
from tests.unit.services import RECEIVER_APPLICATION, SERVICES
from tests.utils import github_webhook

pytestmark = pytest.mark.skipif(
    not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()) or not shutil.which("gunicorn"),
    reason="needs nginx and gunicorn",
)
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
SECRET = b"a webhook secret for the listener tests"
TRIGGER = "/api/services/trigger_build"
PER_SOURCE = VALUES["webhooks_connections_per_source"]


@dataclass
class Listener:
    root: Path
    port: int

    def connect(self, source: str, timeout: float = 30) -> socket.socket:
        client = socket.socket()
        client.settimeout(timeout)
        client.bind((source, 0))
        client.connect(("127.0.0.1", self.port))
        return client

    def post(self, source: str, body: bytes, **options: str) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        connection.sock = self.connect(source)
        options.setdefault("delivery", str(uuid.uuid4()))
        return github_webhook.post(connection, TRIGGER, body, secret=SECRET, **options)[0]

    def open_files(self, folder: str) -> list[str]:
        """Files under root/folder that nginx's workers have open."""
        master = (self.root / "run/nginx/nginx.pid").read_text().strip()
        workers = [
            entry.name for entry in Path("/proc").iterdir()
            if entry.name.isdigit() and (entry / "stat").exists()
            and (entry / "stat").read_text().rsplit(")", 1)[1].split()[1] == master
        ]  # fmt: skip
        under = str(self.root / folder) + "/"
        found = []
        for worker in workers:
            for fd in Path(f"/proc/{worker}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith(under) and not target.endswith(".sock"):
                    found.append(target)
        return found

    def logged(self, text: str) -> bool:
        """Whether nginx's log of the requests it answered has text (it writes the line just
        after the reply)."""
        deadline = time.monotonic() + 30
        while text not in (self.root / "state/services.log").read_text():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


def push(name: str) -> bytes:
    payload = {"ref": "refs/heads/main", "after": os.urandom(20).hex(),
               "repository": {"full_name": f"QubesOS/qubes-{name}"}}  # fmt: skip
    return json.dumps(payload).encode()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_path(path: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def start_listener(root: Path, **variables: object) -> Iterator[Listener]:
    """The receiver under gunicorn and nginx with the role's configuration, in root."""
    run, state = root / "run", root / "state"
    for folder in (run / "nginx", run / "receiver", state / "spool/active"):
        folder.mkdir(parents=True)
    (root / "secret").write_bytes(SECRET)
    settings = {"secret_file": str(root / "secret"), "max_body": VALUES["webhooks_max_body"],
                "spool_directory": str(state / "spool"), "spool_max_events": 1000,
                "spool_max_bytes": 1 << 24, "log_file": str(state / "webhooks.log"),
                "log_max_bytes": 1 << 24, "build_vms_list": str(root / "build-vms.list"),
                "call_timeout": 5, "max_command_bytes": 8192}  # fmt: skip
    (root / "webhooks.json").write_text(json.dumps(settings))
    port = free_port()
    values = {**VALUES, "_webhooks_run_dir": str(run), "_webhooks_state_dir": str(state),
              "_webhooks_nginx_body_dir": str(root / "body"), "webhooks_port": port,
              **variables}  # fmt: skip
    configuration = render_template("webhooks", "webhooks-nginx.conf.j2", **values)
    if os.geteuid() == 0:
        # Its workers would otherwise be `nobody`, who cannot enter the test's folders.
        configuration = "user root;\n" + configuration
    (root / "nginx.conf").write_text(configuration)
    socket_path = run / "receiver/receiver.sock"
    receiver = subprocess.Popen(
        ["gunicorn", "--bind", f"unix:{socket_path}", "--workers", "2",
         "--chdir", str(SERVICES), RECEIVER_APPLICATION],
        env={**os.environ, "WEBHOOKS_SETTINGS": str(root / "webhooks.json")},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    nginx = None
    try:
        wait_for_path(socket_path)
        nginx = subprocess.Popen([NGINX, "-e", "stderr", "-c", str(root / "nginx.conf"),
                                  "-g", "daemon off;"], stderr=subprocess.PIPE)  # fmt: skip
        wait_for_path(run / "nginx/nginx.pid")
        yield Listener(root, port)
    finally:
        for process in (nginx, receiver):
            if process is not None:
                process.terminate()
                process.wait(30)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    yield from start_listener(tmp_path, webhooks_allowed_networks=["127.0.0.0/8"])


def slow_body(listener: Listener, source: str) -> socket.socket:
    """A request whose body comes slowly: its headers, then 64 KiB of a 1 MiB body."""
    client = listener.connect(source)
    client.sendall(
        f"POST {TRIGGER} HTTP/1.1\r\nHost: x\r\nX-GitHub-Event: push\r\n"
        f"X-Hub-Signature-256: sha256=00\r\nContent-Length: {1 << 20}\r\n\r\n".encode()
        + b" " * 65536
    )
    return client


def test_by_default_only_githubs_hook_ranges_are_let_in(tmp_path: Path) -> None:
    for listener in start_listener(tmp_path):
        assert listener.post("127.0.0.2", push("from-loopback")) == 403
        assert listener.logged("source=127.0.0.2 route=/api/services/trigger_build status=403")
    configuration = (tmp_path / "nginx.conf").read_text()
    assert "allow 192.30.252.0/22;" in configuration and "allow 2606:50c0::/32;" in configuration


def test_any_source_is_let_in_when_asked_explicitly(tmp_path: Path) -> None:
    for listener in start_listener(tmp_path, webhooks_allowed_networks=["0.0.0.0/0", "::/0"]):
        assert listener.post("127.0.0.2", push("from-anywhere")) == 202


def test_slow_clients_of_one_source_hold_its_share_only_and_their_bodies_go_to_disk(
    listener: Listener,
) -> None:
    held = [slow_body(listener, "127.0.0.2") for _ in range(PER_SOURCE)]
    try:
        # Their bodies are read into files on disk (unlinked at once), not into /run.
        deadline = time.monotonic() + 10
        while len(listener.open_files("body")) < PER_SOURCE and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(listener.open_files("body")) == PER_SOURCE
        assert listener.open_files("run") == []
        # The same source gets no more; another is served at once.
        assert listener.post("127.0.0.2", push("same-source")) == 429
        assert listener.post("127.0.0.3", push("other-source")) == 202
    finally:
        for client in held:
            client.close()
    assert listener.logged("source=127.0.0.2 route=/api/services/trigger_build status=429")


def test_a_source_past_its_rate_gets_429_and_another_source_does_not(tmp_path: Path) -> None:
    limits = {"webhooks_requests_per_second_per_source": 1, "webhooks_request_burst_per_source": 5}
    for listener in start_listener(tmp_path, webhooks_allowed_networks=["127.0.0.0/8"], **limits):
        statuses = []
        for _ in range(20):
            connection = http.client.HTTPConnection("127.0.0.1", listener.port, timeout=30)
            connection.sock = listener.connect("127.0.0.4")
            connection.request("GET", TRIGGER)
            statuses.append(connection.getresponse().status)
            connection.close()
        # The receiver answers GET with 405; past the burst, nginx answers 429 itself.
        assert statuses[:6] == [405] * 6 and statuses.count(429) >= 10, statuses
        assert listener.post("127.0.0.5", push("rate-other")) == 202


def test_headers_that_keep_coming_slowly_are_cut_at_the_total_header_deadline(
    listener: Listener,
) -> None:
    client = listener.connect("127.0.0.6")
    started = time.monotonic()
    client.sendall(b"POST " + TRIGGER.encode() + b" HTTP/1.1\r\n")
    closed = False
    try:
        while time.monotonic() - started < 30:
            client.sendall(b"X-Slow: 1\r\n")
            time.sleep(0.5)
    except (BrokenPipeError, ConnectionResetError):
        closed = True
    # nginx counts 5 s from the first byte, once more if the request line came late: <= 10 s.
    assert closed and time.monotonic() - started < 12
