"""Benchmark of the webhook receiver, run inside `qubesim dom0` (see `make bench`).

On the simulated example converged with the webhooks role, signed push webhooks are posted to the
net qube's port 80 over loopback by a few concurrent clients (keep-alive connections, as a busy
GitHub would), while the worker fans the accepted triggers out over qrexec to the build qubes
(their TriggerBuild replaced by a service that only exits, for the time of the run). Side by side,
in the same run: the same clients against a path nginx answers itself (the floor: nginx and
loopback alone). Printed: requests per second, p50 and p99 latency, and the deliveries made.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import os
import secrets
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
        json.dump({**variables, "webhooks_secret": secret}, extra)
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


def signed_pushes(secret: str, count: int) -> list[Request]:
    requests = []
    for number in range(count):
        body = json.dumps(
            {"repository": {"full_name": f"QubesOS/qubes-bench-{number % COMPONENTS}"}}
        )
        signature = hmac.new(secret.encode(), body.encode(), hashlib.sha256).hexdigest()
        headers = {
            "X-GitHub-Event": "push",
            "X-Hub-Signature-256": f"sha256={signature}",
            "X-GitHub-Delivery": f"bench-{number}",
            "Content-Type": "application/json",
        }
        requests.append(("POST", "/api/services/trigger_build", body.encode(), headers))
    return requests


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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
