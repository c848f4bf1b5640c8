"""The whole story on qubesim, as a release engineer meets it: GitHub signs a push webhook for a
component; the net qube checks it and hands it to every build qube; only the environment whose
builder knows the component builds it; the build's output streams to the logs qube and lands as
one signed commit in the logs repository; only then does the keys qube sign the artifact; the
artifact and its signature reach the upload server through the net qube's ssh proxy."""

from __future__ import annotations

import http.client
import subprocess
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from qubesim import world
from tests.integration.conftest import as_root, audit_since, run_tool
from tests.integration.converged.chain import BUILDER, Chain
from tests.utils.github_webhook import post, push_body

# The example's environments: fedora's release configuration builds it, kernel's does not.
COMPONENT = "core-admin"


def wait_for(path: Path, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never arrived"
        time.sleep(0.5)


def calls(since: datetime, service: str) -> set[tuple[str, str, str]]:
    """(source, actual target, decision) of every call of service (with its argument)."""
    return {
        (str(e["source"]), str(e["actual_target"]), str(e["decision"]))
        for e in audit_since(since)
        if f"{e['service']}+{e['argument']}".rstrip("+") == service
    }


def test_a_signed_push_is_built_logged_signed_and_uploaded(chain: Chain) -> None:
    uploads = chain.world.uploads
    for name in (f"{COMPONENT}.tar", f"{COMPONENT}.tar.asc"):
        (uploads / name).unlink(missing_ok=True)
    as_root("build-kernel", f"rm -rf {BUILDER}/artifacts/{COMPONENT}")
    started = datetime.now(UTC)
    body = push_body(f"QubesOS/qubes-{COMPONENT}")
    status, _ = post(
        http.client.HTTPConnection("127.0.0.1", 80, timeout=30),
        "/api/services/trigger_build",
        body,
        secret=str(chain.world.variables()["webhooks_secret"]).encode(),
        delivery=f"end-to-end-{uuid.uuid4()}",  # each run is a delivery of its own
    )
    assert status in (200, 202)

    wait_for(uploads / f"{COMPONENT}.tar.asc")
    artifact = (uploads / f"{COMPONENT}.tar").read_bytes()

    # Every build qube was asked; only the one whose builder knows the component built it.
    assert calls(started, f"qubesbuilder.TriggerBuild+{COMPONENT}") == {
        ("sys-net", "build-fedora", "allow"),
        ("sys-net", "build-kernel", "allow"),
    }
    kernel = as_root("build-kernel", f"test -e {BUILDER}/artifacts/{COMPONENT}", check=False)
    assert kernel.returncode != 0
    # The upload's ssh connection went through the proxy (logged when it ends: close it).
    run_tool("qvm-run", "build-fedora", f"ssh -O exit {world.UPLOAD_HOST}", check=False)
    deadline = time.monotonic() + 30
    proxied = set()
    while ("build-fedora", "sys-net", "allow") not in proxied and time.monotonic() < deadline:
        time.sleep(0.5)
        proxied = calls(started, f"local.ConnectSSH+{world.UPLOAD_HOST}")
    assert proxied == {("build-fedora", "sys-net", "allow")}

    # The build log: one commit, signed by the logs key, with every line the build printed.
    name = as_root("build-fedora", f"cat {BUILDER}/artifacts/{COMPONENT}/log-name").stdout.strip()
    git = ["git", "--git-dir", str(chain.world.logs_repository)]
    environment = chain.world.environment()
    subject = subprocess.run([*git, "log", "-1", "--format=%s", "master"], env=environment,
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert subject.strip() == f"Build log {name}"
    verified = subprocess.run([*git, "verify-commit", "master"], env=environment,
                              capture_output=True, text=True, check=False)  # fmt: skip
    assert verified.returncode == 0, verified.stderr
    stored = subprocess.run([*git, "show", f"master:{name}"], env=environment,
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    steps = [f"step {n} of {COMPONENT}" for n in (1, 2, 3)]
    for line in (f"building {COMPONENT} in {BUILDER}", *steps, f"built {COMPONENT}.tar"):
        assert f": {line}\n" in stored

    # The signature is keys-fedora's.
    check = subprocess.run(
        ["bash", "-c", 'home=$(mktemp -d); trap "rm -rf $home" EXIT; '
         'gpg --homedir "$home" --batch --quiet --import "$1" && '
         'gpg --homedir "$home" --batch --verify "$2" "$3"', "verify",
         str(chain.public_keys / "keys-fedora.asc"), str(uploads / f"{COMPONENT}.tar.asc"),
         str(uploads / f"{COMPONENT}.tar")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert check.returncode == 0 and "Good signature" in check.stderr, check.stderr
    assert artifact.startswith(f"{COMPONENT}, built from ".encode())
