"""The signing chain on qubesim: a build qube's log reaches the logs repository (signed commit,
pushed over ssh to a real sshd), and only then may the build qube sign, in its own keys qube only.
Every way it must fail is tried through the same qubes, policy and services as in Qubes."""

from __future__ import annotations

import re
import subprocess
import time

from qubesim import world
from tests.integration.conftest import Policy, as_root, questions, run_tool
from tests.integration.converged.chain import BUILDER, Chain, build, in_qube, verify_signature

STAT = "/run/qubes-gpg-split/stat.{}"


def send_log(build_qube: str, text: str) -> subprocess.CompletedProcess[str]:
    return in_qube(build_qube, "qrexec-client-vm dom0 qubesbuilder.BuildLog", input=text)


def sign(build_qube: str) -> subprocess.CompletedProcess[str]:
    return in_qube(build_qube, "qubes-gpg-client-wrapper --armor --detach-sign", input="artifact\n")


def close_window(keys_qube: str, build_qube: str) -> None:
    as_root(keys_qube, f"rm -f {STAT.format(build_qube)}")


def window_open(keys_qube: str, build_qube: str) -> bool:
    return as_root(keys_qube, f"test -e {STAT.format(build_qube)}", check=False).returncode == 0


def secret_keys(qube: str) -> list[str]:
    """Fingerprints of the secret keys (and subkeys) in a qube's keyring."""
    listing = in_qube(qube, "gpg --batch --with-colons --list-secret-keys").stdout
    return [line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:")]


def test_a_log_opens_the_signing_window_of_its_own_keys_qube_only(chain: Chain) -> None:
    for env in ("fedora", "kernel"):
        close_window(f"keys-{env}", f"build-{env}")
    refused = sign("build-fedora")
    assert refused.returncode != 0 and "BEGIN PGP SIGNATURE" not in refused.stdout
    # Refused at once, in the keys qube: nobody is asked (split-GPG's own service would ask).
    assert questions("keys-fedora") == []
    assert (
        "refused a signing request from 'build-fedora'"
        in as_root("keys-fedora", "journalctl -t qubes.Gpg --no-pager -o cat").stdout
    )

    sent = send_log("build-fedora", "compiling foo\nlinking foo\n")
    assert sent.returncode == 0, sent.stderr
    name = sent.stdout.strip()
    assert name.startswith("build-fedora/log_")
    stored = chain.logs("show", f"master:{name}").stdout
    assert "build-fedora: compiling foo" in stored and "build-fedora: linking foo" in stored
    verified = chain.logs("verify-commit", "--raw", "master")
    assert f"VALIDSIG {chain.logs_key}" in verified.stderr.replace("\n", " ") or (
        chain.logs_key in verified.stderr
    ), verified.stderr

    assert window_open("keys-fedora", "build-fedora")
    assert not window_open("keys-kernel", "build-fedora")
    assert not window_open("keys-kernel", "build-kernel")
    signature = sign("build-fedora")
    assert signature.returncode == 0, signature.stderr
    assert "BEGIN PGP SIGNATURE" in signature.stdout
    assert sign("build-kernel").returncode != 0

    public_key = (chain.public_keys / "keys-fedora.asc").read_text()
    keyring = chain.world.directory / "verify"
    keyring.mkdir(mode=0o700, exist_ok=True)
    environment = {"GNUPGHOME": str(keyring), "PATH": "/usr/bin:/bin"}
    subprocess.run(["gpg", "--batch", "--import"], input=public_key, env=environment,
                   text=True, capture_output=True, check=True)  # fmt: skip
    (keyring / "artifact.asc").write_text(signature.stdout)
    (keyring / "artifact").write_text("artifact\n")
    good = subprocess.run(
        ["gpg", "--batch", "--verify", str(keyring / "artifact.asc"), str(keyring / "artifact")],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    assert good.returncode == 0, good.stderr


def test_log_received_only_from_the_logs_qube_for_its_own_build_qube(
    chain: Chain, policy: Policy
) -> None:
    close_window("keys-fedora", "build-kernel")
    close_window("keys-fedora", "build-fedora")
    # dom0 is not the logs qube: refused by the service itself.
    from_dom0 = run_tool(
        "qvm-run", "--pass-io", "--service", "keys-fedora", "qubesbuilder.LogReceived+build-fedora",
        check=False,
    )  # fmt: skip
    assert from_dom0.returncode != 0
    # A policy that wrongly let the logs qube name another environment's build qube.
    policy(
        "qubesbuilder.LogReceived +build-kernel build-logs keys-fedora allow",
        name="10-wrong-log-received.policy",
    )
    wrong = in_qube(
        "build-logs", "qrexec-client-vm keys-fedora qubesbuilder.LogReceived+build-kernel"
    )
    assert wrong.returncode != 0
    assert not window_open("keys-fedora", "build-kernel")
    assert not window_open("keys-fedora", "build-fedora")
    logged = in_qube("keys-fedora", "cat ~/.local/state/qubesbuilder/log-received.log").stdout
    assert "from 'dom0' for 'build-fedora'" in logged
    assert "from 'build-logs' for 'build-kernel'" in logged


def test_a_log_whose_push_failed_opens_nothing_and_goes_with_the_next(chain: Chain) -> None:
    close_window("keys-fedora", "build-fedora")
    before = chain.logs("rev-parse", "master").stdout
    world.stop_sshd(chain.world)
    try:
        failed = send_log("build-fedora", "built while the server was down\n")
    finally:
        world.start_sshd(chain.world)
    assert failed.returncode != 0
    assert not window_open("keys-fedora", "build-fedora")
    assert chain.logs("rev-parse", "master").stdout == before
    second = send_log("build-fedora", "built after\n")
    assert second.returncode == 0, second.stderr
    pushed = chain.logs("log", "--format=%s", f"{before.strip()}..master").stdout.split("\n")
    assert sorted(line.removeprefix("Build log ") for line in pushed if line) == sorted(
        [failed.stdout.strip(), second.stdout.strip()]
    )
    assert window_open("keys-fedora", "build-fedora")


def test_secret_keys_stay_in_the_keys_qubes_which_have_no_network(chain: Chain) -> None:
    signing_keys = {secret_keys(f"keys-{env}")[0] for env in ("fedora", "kernel")}
    for qube in ("build-fedora", "build-kernel"):
        assert secret_keys(qube) == []
    assert chain.logs_key in secret_keys("build-logs")
    assert not signing_keys & set(secret_keys("build-logs"))
    for env in ("fedora", "kernel"):
        interfaces = in_qube(f"keys-{env}", "ls /sys/class/net").stdout.split()
        assert interfaces == ["lo"]


def test_a_keys_qube_with_a_network_is_refused(chain: Chain) -> None:
    run_tool("qvm-prefs", "keys-kernel", "netvm", "sys-firewall")
    try:
        refused = chain.play("--tags", "keys_vm", "--limit", "keys-kernel")
    finally:
        run_tool("qvm-prefs", "keys-kernel", "netvm", "")
    assert refused.returncode != 0
    assert "keys-kernel has netvm sys-firewall: a keys qube holds a signing key" in refused.stdout


def test_one_role_alone_keeps_and_repairs_what_it_manages(chain: Chain) -> None:
    """`--tags build_vm` on the converged site changes nothing; with the build qube's settings
    removed it writes them back whole, the signing key included, although the keys_vm play (which
    learns that key in the keys qube) is left out."""
    settings = "cat /home/user/builder-github.conf"
    written = as_root("build-fedora", settings).stdout
    assert "\nSIGN_KEY = " in written
    converged = chain.play("--tags", "build_vm")
    assert converged.returncode == 0, converged.stdout + converged.stderr
    assert re.search(r"changed=[1-9]", converged.stdout) is None, converged.stdout
    as_root("build-fedora", "rm /home/user/builder-github.conf")
    try:
        repaired = chain.play("--tags", "build_vm", "--limit", "build-fedora")
        assert repaired.returncode == 0, repaired.stdout + repaired.stderr
        assert as_root("build-fedora", settings, check=False).stdout == written
    finally:  # the builds of the next tests sign with it
        as_root("build-fedora", "cat > /home/user/builder-github.conf", input=written)


def stored_lines(chain: Chain, name: str) -> list[str]:
    """The lines a build sent, as stored in the logs repository (without time and source)."""
    text = chain.logs("show", f"master:{name}").stdout
    lines = [line.split(": ", 1)[1] for line in text.splitlines()]
    assert lines[0] == "> starting log" and lines[-1] == "> closing log", lines
    return lines[1:-1]


def test_a_build_commits_its_whole_log_once_and_signs_with_its_key(chain: Chain) -> None:
    close_window("keys-fedora", "build-fedora")
    before = chain.logs("rev-parse", "master").stdout.strip()
    built = build("build-fedora", "core-admin", BUILD_STEPS="5")
    assert built.returncode == 0, built.stdout + built.stderr
    commits = chain.logs("rev-list", f"{before}..master").stdout.split()
    assert len(commits) == 1
    out = f"{BUILDER}/artifacts/core-admin"
    name = in_qube("build-fedora", f"cat {out}/log-name").stdout.strip()
    printed = in_qube("build-fedora", f"cat {out}/build.log").stdout.splitlines()
    assert len(printed) == 7 and printed[-1] == "built core-admin.tar"
    assert stored_lines(chain, name) == printed
    assert (
        f"VALIDSIG {chain.logs_key}"
        in chain.logs("verify-commit", "--raw", commits[0]).stderr.replace("\n", " ")
        or chain.logs_key in chain.logs("verify-commit", "--raw", commits[0]).stderr
    )
    artifact = in_qube("build-fedora", f"cat {out}/core-admin.tar").stdout
    signature = in_qube("build-fedora", f"cat {out}/core-admin.tar.asc").stdout
    assert verify_signature(chain, "keys-fedora", artifact, signature)
    assert not verify_signature(chain, "keys-kernel", artifact, signature)


def test_signing_after_the_window_is_refused(chain: Chain) -> None:
    sent = send_log("build-fedora", "a build\n")
    assert sent.returncode == 0, sent.stderr
    assert sign("build-fedora").returncode == 0
    as_root("keys-fedora", f"touch -d '10 minutes ago' {STAT.format('build-fedora')}")
    late = sign("build-fedora")
    assert late.returncode != 0 and "BEGIN PGP SIGNATURE" not in late.stdout
    assert questions("keys-fedora") == []


def test_a_killed_build_leaves_every_line_it_sent(chain: Chain) -> None:
    before = chain.logs("rev-parse", "master").stdout.strip()
    out = f"{BUILDER}/artifacts/killed"
    as_root("build-fedora", f"rm -rf {out}")
    in_qube(
        "build-fedora",
        f"STEP_DELAY=0.2 BUILD_STEPS=100000 setsid {BUILDER}/scripts/auto-build killed"
        " </dev/null >/dev/null 2>&1 &",
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        printed = in_qube("build-fedora", f"cat {out}/build.log 2>/dev/null").stdout
        if printed.count("step ") >= 5:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the build printed nothing")
    as_root("build-fedora", "pkill -KILL -f 'auto-build killed'")
    deadline = time.monotonic() + 120
    while chain.logs("rev-parse", "master").stdout.strip() == before:
        assert time.monotonic() < deadline, "the killed build's log never reached the repository"
        time.sleep(0.5)
    name = in_qube("build-fedora", f"cat {out}/log-name").stdout.strip()
    printed_lines = in_qube("build-fedora", f"cat {out}/build.log").stdout.splitlines()
    assert len(printed_lines) >= 5
    assert stored_lines(chain, name) == printed_lines
    assert in_qube("build-fedora", f"test -e {out}/killed.tar.asc").returncode != 0


def test_the_logs_qube_restarted_between_builds_loses_nothing(chain: Chain) -> None:
    first = send_log("build-kernel", "before the restart\n")
    assert first.returncode == 0, first.stderr
    run_tool("qvm-shutdown", "--wait", "build-logs")
    second = send_log("build-kernel", "after the restart\n")
    assert second.returncode == 0, second.stderr
    assert stored_lines(chain, first.stdout.strip()) == ["before the restart"]
    assert stored_lines(chain, second.stdout.strip()) == ["after the restart"]
