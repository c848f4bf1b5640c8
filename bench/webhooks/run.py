"""Benchmark of the webhook receiver, run inside `qubesim dom0` (see `make bench`).

On the simulated example converged with the webhooks role, signed push webhooks are posted to the
net qube's port 80 over loopback by a few concurrent clients (keep-alive connections, as a busy
GitHub would), while the worker fans the accepted triggers out over qrexec to the build qubes
(their TriggerBuild replaced by a service that only exits, for the time of the run). Side by side,
in the same run: the same clients against a path nginx answers itself (the floor: nginx and
loopback alone). Printed: requests per second, p50 and p99 latency, and the deliveries made.

Then the listener under slow clients: signed pushes, one at a time from their own source address
(127.0.0.9), timed without other load and while 4 other source addresses (127.0.0.2-5) each
hold as many slow requests as nginx lets one source hold, and try 4 more (answered 429): bodies
of 1 MiB sent 64 KiB at once, then a byte a second. The bench converges with the per-source
request rate raised, so that its throughput clients (all from 127.0.0.1) measure the receiver,
not the rate limit; the connection limits are the role's defaults.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INVENTORY = "inventory/qubesim/build_infra.yml"
BUILD_QUBES = ("build-fedora", "build-kernel")
SERVICE = "/usr/local/etc/qubes-rpc/qubesbuilder.TriggerBuild"
LOG = "/home/user/.local/state/qubes-infra-build/webhooks/webhooks.log"
CLIENTS = 4
COMPONENTS = 20
PER_SOURCE = 8  # the role's default webhooks_connections_per_source
SLOW_SOURCES = [f"127.0.0.{n}" for n in range(2, 6)]
SIGNED_SOURCE = "127.0.0.9"
SIGNED_COUNT = 100
Request = tuple[str, str, bytes, dict[str, str]]


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result


def as_root(qube: str, command: str) -> str:
    return run(["qvm-run", "--pass-io", "--user", "root", qube, command]).stdout


def converge() -> str:
    """The webhooks role on the example; the world's secret, or one made for the bench."""
    run(["qubesim", "world", "up"])
    variables = json.loads(Path(run(["qubesim", "world", "variables"]).stdout.strip()).read_text())
    secret = str(variables.get("webhooks_secret") or secrets.token_hex(32))
    with tempfile.NamedTemporaryFile("w", suffix=".json") as extra:
        os.chmod(extra.name, 0o600)
        raised = {"webhooks_requests_per_second_per_source": 100000,
                  "webhooks_request_burst_per_source": 100000}  # fmt: skip
        json.dump({**variables, **raised, "webhooks_secret": secret}, extra)
        extra.flush()
        run(
            ["ansible-playbook", "-i", INVENTORY, "-e", f"@{extra.name}", "--tags",
             "dom0,webhooks", "site.yml"],
            cwd=ROOT,
            env={**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg")},
        )  # fmt: skip
    return secret


def client(requests: list[Request], out: list[float], statuses: list[int]) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", 80, timeout=60)
    for method, path, body, headers in requests:
        started = time.perf_counter()
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        out.append(time.perf_counter() - started)
        statuses.append(response.status)
        if response.getheader("Connection", "").lower() == "close":
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", 80, timeout=60)
    connection.close()


def load(requests: list[Request]) -> tuple[float, list[float], set[int]]:
    """Requests shared among CLIENTS threads: wall seconds, latencies, statuses seen."""
    latencies: list[list[float]] = [[] for _ in range(CLIENTS)]
    statuses: list[list[int]] = [[] for _ in range(CLIENTS)]
    threads = [
        threading.Thread(target=client, args=(requests[n::CLIENTS], latencies[n], statuses[n]))
        for n in range(CLIENTS)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return wall, sorted(x for part in latencies for x in part), {s for p in statuses for s in p}


def signed_pushes(secret: str, count: int, prefix: str = "bench") -> list[Request]:
    """Pushes as GitHub sends them, each a delivery of its own (the receiver acts on one once)."""
    requests = []
    for number in range(count):
        body = json.dumps({
            "ref": "refs/heads/main",
            "after": secrets.token_hex(20),
            "repository": {"full_name": f"QubesOS/qubes-{prefix}-{number % COMPONENTS}",
                           "pushed_at": int(time.time())},
        })  # fmt: skip
        signature = hmac.new(secret.encode(), body.encode(), hashlib.sha256).hexdigest()
        headers = {
            "X-GitHub-Event": "push",
            "X-Hub-Signature-256": f"sha256={signature}",
            "X-GitHub-Delivery": f"{prefix}-{secrets.token_hex(8)}",
            "Content-Type": "application/json",
        }
        requests.append(("POST", "/api/services/trigger_build", body.encode(), headers))
    return requests


def one_at_a_time(requests: list[Request], source: str) -> list[float]:
    """Latencies of requests sent one after the other, each on a connection from source."""
    latencies = []
    for method, path, body, headers in requests:
        started = time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", 80, timeout=60)
        connection.sock = socket.create_connection(("127.0.0.1", 80), 60, (source, 0))
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        connection.close()
        latencies.append(time.perf_counter() - started)
        if response.status not in (200, 202):
            raise SystemExit(f"a signed push from {source} got {response.status}")
    return latencies


def slow_request(source: str) -> socket.socket:
    client = socket.socket()
    client.settimeout(60)
    client.bind((source, 0))
    client.connect(("127.0.0.1", 80))
    client.sendall(
        b"POST /api/services/trigger_build HTTP/1.1\r\nHost: x\r\nX-GitHub-Event: push\r\n"
        + f"X-Hub-Signature-256: sha256=00\r\nContent-Length: {1 << 20}\r\n\r\n".encode()
        + b" " * 65536
    )
    return client


def trickle(clients: list[socket.socket], stop: threading.Event) -> None:
    """A byte a second on each slow request: never a pause long enough for nginx to end it."""
    while not stop.wait(1):
        for client in clients:
            with contextlib.suppress(OSError):
                client.send(b" ")


def under_slow_clients(requests: list[Request]) -> tuple[list[float], int]:
    """Latencies of requests from SIGNED_SOURCE while the slow sources try PER_SOURCE + 4 slow
    requests each; how many of those nginx answered 429."""
    held = [slow_request(source) for source in SLOW_SOURCES for _ in range(PER_SOURCE + 4)]
    stop = threading.Event()
    trickling = threading.Thread(target=trickle, args=(held, stop), daemon=True)
    trickling.start()
    try:
        time.sleep(1)
        latencies = one_at_a_time(requests, SIGNED_SOURCE)
        refused = 0
        for client in held:
            client.setblocking(False)
            with contextlib.suppress(OSError):
                refused += client.recv(64).startswith(b"HTTP/1.1 429")
    finally:
        stop.set()
        trickling.join()
        for client in held:
            client.close()
    return sorted(latencies), refused


def quantile(values: list[float], fraction: float) -> float:
    return values[min(len(values) - 1, int(fraction * len(values)))]


def figures(name: str, rate: float, latencies: list[float]) -> str:
    p50, p99 = statistics.median(latencies) * 1000, quantile(latencies, 0.99) * 1000
    return f"  {name:27}{rate:8.0f} req/s  p50 {p50:6.1f} ms  p99 {p99:6.1f} ms"


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    secret = converge()
    for qube in BUILD_QUBES:
        as_root(qube, f"mkdir -p {SERVICE.rsplit('/', 1)[0]}; [ ! -e {SERVICE} ] || "
                      f"mv {SERVICE} {SERVICE}.bench; printf '#!/bin/sh\\nexit 0\\n' > {SERVICE};"
                      f" chmod 0755 {SERVICE}")  # fmt: skip
    try:
        before = as_root("sys-net", f"grep -c 'decision=delivered' {LOG} || true").strip()
        floor_wall, floor, _ = load([("GET", "/bench-floor", b"", {})] * count)
        wall, latencies, statuses = load(signed_pushes(secret, count))
        time.sleep(2)  # the last triggers' delivery
        after = as_root("sys-net", f"grep -c 'decision=delivered' {LOG} || true").strip()
        alone = sorted(one_at_a_time(signed_pushes(secret, SIGNED_COUNT, "alone"), SIGNED_SOURCE))
        loaded, refused = under_slow_clients(signed_pushes(secret, SIGNED_COUNT, "loaded"))
    finally:
        for qube in BUILD_QUBES:
            as_root(
                qube, f"rm -f {SERVICE}; [ ! -e {SERVICE}.bench ] || mv {SERVICE}.bench {SERVICE}"
            )
    if not statuses <= {200, 202}:
        raise SystemExit(f"unexpected statuses: {sorted(statuses)}")
    print(f"webhook receiver, {count} signed pushes ({COMPONENTS} components), {CLIENTS} clients:")
    print(figures("nginx alone (floor)", count / floor_wall, floor))
    print(figures("signed, verified, spooled", count / wall, latencies))
    print(f"  receiver / floor           {wall / floor_wall:8.2f}x the time")
    # The worker logs one line per call to a build qube, each qube's queue on its own.
    print(f"  calls to the {len(BUILD_QUBES)} build qubes during the run: "
          f"{int(after) - int(before)} (triggers coalesced per component)")  # fmt: skip
    slow = len(SLOW_SOURCES) * PER_SOURCE
    print(f"listener, {SIGNED_COUNT} signed pushes one at a time from {SIGNED_SOURCE}:")
    print(figures("without slow clients", SIGNED_COUNT / sum(alone), alone))
    print(figures(f"with {slow} slow from {len(SLOW_SOURCES)} srcs", SIGNED_COUNT / sum(loaded),
                  loaded))  # fmt: skip
    print(f"  slow requests past {PER_SOURCE} per source answered 429: {refused} of "
          f"{len(SLOW_SOURCES) * 4}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
