"""Conformance of qubesim's qrexec tools with upstream's: qvm-run, qrexec-client-vm,
qrexec-policy-exec, split-GPG's client side, and where a call to the caller itself is refused.
Each test states upstream's behaviour and names the upstream file and function it comes from."""

from __future__ import annotations

import os
import pty
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from tests.integration.conftest import Policy, Qvm, as_root, audit_since, run_tool

MARKER_SERVICE = """#!/bin/sh
touch /tmp/test-marker-ran
echo "ran in $(hostname) for $QREXEC_REMOTE_DOMAIN"
"""


def install_service(qube: str, name: str, script: str) -> None:
    as_root(
        qube,
        f"mkdir -p /usr/local/etc/qubes-rpc && cat > /usr/local/etc/qubes-rpc/{name}"
        f" && chmod 755 /usr/local/etc/qubes-rpc/{name}",
        input=script,
    )


def in_qube(qvm: Qvm, qube: str, command: str, data: str = "") -> subprocess.CompletedProcess[str]:
    return qvm("qvm-run", "--pass-io", qube, command, input=data, check=False)


def marker_ran(qvm: Qvm, qube: str) -> bool:
    return in_qube(qvm, qube, "test -e /tmp/test-marker-ran").returncode == 0


@pytest.fixture(scope="module")
def two_qubes() -> Iterator[tuple[str, str]]:
    """(source, target): two network-less qubes with the test services, shared by this module."""
    names = (f"c{os.getpid() % 10000}-src", f"c{os.getpid() % 10000}-tgt")
    try:
        for name in names:
            run_tool("qvm-create", "--label", "red", "--property", "netvm=", name)
            install_service(name, "test.Marker", MARKER_SERVICE)
        install_service(names[1], "test.Cat", "#!/bin/sh\nexec cat\n")
        yield names
    finally:
        for name in names:
            run_tool("qvm-remove", "--force", name, check=False)


@pytest.fixture
def qubes(two_qubes: tuple[str, str], qvm: Qvm) -> tuple[str, str]:
    for name in two_qubes:
        in_qube(qvm, name, "rm -f /tmp/test-marker-ran")
    return two_qubes


# -- issue 8: a call to the caller itself ----------------------------------------------------------
def test_a_loopback_call_evaluates_as_allowed_but_is_refused_when_run(
    qvm: Qvm, policy: Policy, qubes: tuple[str, str]
) -> None:
    # qubes-core-qrexec, qrexec/policy/parser.py: Allow.evaluate has no loopback check;
    # AllowResolution.execute raises AccessDenied("loopback qrexec connection not supported");
    # qrexec/tools/qrexec_policy_exec.py, JustEvaluateAllowResolution.execute answers allow.
    source, target = qubes
    path = policy(
        f"test.Marker * {source} @default allow target={source}",
        f"test.Marker * {source} @anyvm allow",
    )
    for requested in (source, "", target):
        evaluated = qvm("qrexec-policy-exec", "--just-evaluate", source, requested, "test.Marker")
        assert (evaluated.returncode, evaluated.stdout, evaluated.stderr) == (0, "", "")
    answered = qvm("qrexec-policy-exec", source, source, "test.Marker", check=False)
    assert (answered.returncode, answered.stdout) == (1, "result=deny\n")
    started = datetime.now(UTC)
    for requested in (source, "''"):
        result = in_qube(qvm, source, f"qrexec-client-vm {requested} test.Marker")
        assert (result.returncode, result.stdout, result.stderr) == (126, "", "Request refused\n")
    assert not marker_ran(qvm, source)
    entries = [e for e in audit_since(started) if e["source"] == source]
    assert [
        (e["target"], e["actual_target"], e["decision"], e["rule"], e["reason"], e["exit_code"])
        for e in entries
    ] == [
        (
            source,
            source,
            "deny",
            f"{path}:2",
            "loopback qrexec connection not supported",
            126,
        ),
        ("", source, "deny", f"{path}:1", "loopback qrexec connection not supported", 126),
    ]


# -- issue 14, item 5: qvm-run ---------------------------------------------------------------------
def run_on_a_terminal(argv: list[str]) -> tuple[int, bytes]:
    """Run with stdout (and stderr) on a new pseudo-terminal; (exit code, what it showed)."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
    os.close(terminal)
    shown = b""
    while True:
        try:
            data = os.read(controller, 65536)
        except OSError:  # EIO: every writer has gone
            break
        if not data:
            break
        shown += data
    os.close(controller)
    return process.wait(timeout=120), shown


def test_qvm_run_as_upstream(qvm: Qvm, qubes: tuple[str, str]) -> None:
    # qubes-core-admin-client, qubesadmin/tools/qvm_run.py: run_command_single quotes every word
    # when there are ARGs; the --filter-escape-chars default is "stdout is a terminal", and main()
    # then colours the output red; run_service(wait=False) for --service without --pass-io;
    # main() skips a halted qube with --no-autostart (retcode 1), saying so only when verbose > 0
    # (and --pass-io lowers the verbosity by one).
    source, target = qubes
    # Every word quoted: a COMMAND with a space is one word, ARGs are never split or expanded.
    quoted = qvm("qvm-run", "--pass-io", source, "printf", "%s|", "a b", "$HOME", "it's")
    assert quoted.stdout == "a b|$HOME|it's|"
    one_word = qvm("qvm-run", "--pass-io", source, "echo hi", "there", check=False)
    assert one_word.returncode == 127 and one_word.stdout == ""
    # Escape characters: kept for a pipe, filtered (and coloured) for a terminal or on request.
    show = "printf 'a\\033[2Jb\\n'"
    assert qvm("qvm-run", "--pass-io", source, show).stdout == "a\x1b[2Jb\n"
    filtered = qvm("qvm-run", "--pass-io", "--filter-escape-chars", source, show).stdout
    assert filtered == "\x1b[0;31ma_[2Jb\n\x1b[0m"
    plain = qvm("qvm-run", "--pass-io", "--filter-escape-chars", "--no-colour-output", source, show)
    assert plain.stdout == "a_[2Jb\n"
    code, shown = run_on_a_terminal(
        ["qvm-run", "--pass-io", "--no-colour-output", "--no-colour-stderr", source, show]
    )
    assert (code, shown.replace(b"\r\n", b"\n")) == (0, b"a_[2Jb\n")
    # --service without --pass-io returns while the service still runs.
    install_service(
        target,
        "test.Slow",
        "#!/bin/sh\nfor i in $(seq 600); do [ -e /tmp/release ] && break; sleep 0.1; done\n"
        "touch /tmp/slow-done\n",
    )
    in_qube(qvm, target, "rm -f /tmp/release /tmp/slow-done")
    started = qvm("qvm-run", "--service", target, "test.Slow")
    assert (started.returncode, started.stderr) == (0, f"Running 'test.Slow' on {target}\n")
    assert in_qube(qvm, target, "test -e /tmp/slow-done").returncode == 1
    in_qube(qvm, target, "touch /tmp/release")
    assert (
        in_qube(
            qvm, target, "for i in $(seq 300); do [ -e /tmp/slow-done ] && exit 0; sleep 0.1; done"
        ).returncode
        == 0
    )
    # --no-autostart on a halted qube: exit code 1, silent with --pass-io (or -q).
    qvm("qvm-shutdown", "--wait", target)
    for options in (["--pass-io"], ["-q"]):
        refused = qvm("qvm-run", "--no-autostart", *options, target, "true", check=False)
        assert (refused.returncode, refused.stdout, refused.stderr) == (1, "", "")
    said = qvm("qvm-run", "--no-autostart", target, "true", check=False)
    assert (said.returncode, said.stderr) == (1, f"Qube '{target}' not started\n")
    assert qvm("qvm-check", "--running", target, check=False).returncode == 1


# -- issue 14, item 6: qrexec-client-vm ------------------------------------------------------------
def test_qrexec_client_vm_as_upstream(qvm: Qvm, policy: Policy, qubes: tuple[str, str]) -> None:
    # qubes-core-qrexec, agent/qrexec-client-vm.c: main() parses "+tTa:p:s:h" and the long
    # options, any other is usage() with status 2; a bad --buffer-size exits 1; -p/-s only once;
    # convert_target_name_keyword turns '$' into '@'; the target is sent as given (empty too);
    # LOCAL_PROGRAM is run with execv (no PATH search) with SAVED_FD_0 and SAVED_FD_1.
    source, target = qubes
    policy(
        f"test.Cat * {source} {target} allow",
        f"test.Cat * {source} @default allow target={target}",
        f"test.Marker * {source} @dispvm deny",
        f"test.Marker * {source} @default allow target={target}",
    )

    def client(arguments: str, data: str = "") -> subprocess.CompletedProcess[str]:
        return in_qube(qvm, source, f"qrexec-client-vm {arguments}", data)

    for arguments in ("--bogus", "-x", "-p a -p b", "-s a -s b", "--prefix-data"):
        usage = client(f"{arguments} {target} test.Cat")
        assert usage.returncode == 2, arguments
        assert "usage:" in usage.stderr
    assert client(target).returncode == 2
    assert client(f"--use-stdin-socket {target} test.Cat </dev/null").returncode == 2
    assert client(f"--buffer-size=12k {target} test.Cat").returncode == 1
    assert client(f"-a /nonexistent {target} test.Cat").returncode == 1
    accepted = "-t -T --no-filter-escape-chars-stdout --no-filter-escape-chars-stderr"
    for options in (accepted, "--buffer-size=65536", "--buffer-size 0x100", "-tT", "--"):
        assert client(f"{options} {target} test.Cat", "data\n").stdout == "data\n", options
    assert client(f"-p first, {target} test.Cat", "then stdin").stdout == "first,then stdin"
    assert client(f"--prefix-data=only {target} test.Cat").stdout == "only"
    assert client(f"-s {target} {target} test.Cat").returncode == 126  # no RemoteVM here
    # '$' keywords become '@'; an empty target is passed on and evaluated as @default.
    started = datetime.now(UTC)
    assert client("'$default' test.Marker").returncode == 0
    assert client("'$dispvm' test.Marker").returncode == 126
    assert client("'' test.Cat", "empty\n").stdout == "empty\n"
    requested = [
        (e["target"], e["actual_target"], e["decision"])
        for e in audit_since(started)
        if e["source"] == source
    ]
    assert requested == [
        ("@default", target, "allow"),
        ("@dispvm", "", "deny"),
        ("", target, "allow"),
    ]
    # LOCAL_PROGRAM: by its path only, with our stdin and stdout kept as SAVED_FD_0/1.
    missing = client(f"{target} test.Cat cat")
    assert missing.returncode != 0 and "execv" in missing.stderr
    saved = client(
        f"{target} test.Cat /bin/sh -c 'echo mine >&$SAVED_FD_1; head -c 5 <&$SAVED_FD_0 >&2'",
        "12345",
    )
    assert (saved.returncode, saved.stdout, saved.stderr) == (0, "mine\n", "12345")


# -- issue 14, item 7: qrexec-policy-exec ----------------------------------------------------------
def test_qrexec_policy_exec_as_upstream(qvm: Qvm, policy: Policy, qubes: tuple[str, str]) -> None:
    # qubes-core-qrexec, qrexec/tools/qrexec_policy_exec.py: get_result only returns an exit
    # code with --just-evaluate (nothing printed); main() prints the policy's answer in the
    # three-argument form; qrexec/policy/parser.py, Request.__init__ reads an empty target as
    # @default and never looks the source up (it is matched by `*`, `@anyvm` and its name only).
    source, target = qubes
    policy(
        f"test.Marker * {source} @default allow target={target}",
        f"test.Marker * @anyvm {target} allow",
        f"test.Other * @tag:no-such-tag {target} allow",
    )

    def evaluate(*call: str) -> tuple[int, str, str]:
        result = qvm("qrexec-policy-exec", "--just-evaluate", *call, check=False)
        return result.returncode, result.stdout, result.stderr

    assert evaluate(source, "", "test.Marker") == (0, "", "")
    assert evaluate(source, "@default", "test.Marker") == (0, "", "")
    assert evaluate(target, source, "test.Marker") == (1, "", "")
    assert evaluate("no-such-qube", target, "test.Marker") == (0, "", "")
    assert evaluate("no-such-qube", target, "test.Other") == (1, "", "")
    uuid = qvm("qvm-prefs", target, "uuid").stdout.strip()
    answered = qvm("qrexec-policy-exec", source, "", "test.Marker")
    assert answered.stdout == (
        f"user=DEFAULT\nresult=allow\ntarget={target}\ntarget_uuid=uuid:{uuid}\n"
        "autostart=True\nrequested_target=@default\n"
    )
    refused = qvm("qrexec-policy-exec", target, source, "test.Marker", check=False)
    assert (refused.returncode, refused.stdout) == (1, "result=deny\n")
    assert qvm("qrexec-policy-exec", source, target, check=False).returncode == 2


# -- issue 14, item 8: split-GPG's client side -----------------------------------------------------
def test_split_gpg_client_reads_only_its_environment(
    qvm: Qvm, policy: Policy, qubes: tuple[str, str]
) -> None:
    # qubes-app-linux-split-gpg: src/gpg-client.c, main() reads only QUBES_GPG_DOMAIN (else an
    # error and exit 1); qubes-gpg.sh sets it from /rw/config/gpg-split-domain, the file winning
    # over the environment, else keeps it, else @default; gpg-client-wrapper sources qubes-gpg.sh.
    source, target = qubes
    as_root(source, f"echo {target} > /rw/config/gpg-split-domain")
    try:
        unset = in_qube(qvm, source, "env -u QUBES_GPG_DOMAIN qubes-gpg-client --list-keys")
        assert (unset.returncode, unset.stderr) == (
            1,
            "ERROR: Destination domain not defined! Set it with QUBES_GPG_DOMAIN env variable.\n",
        )
        login = "env QUBES_GPG_DOMAIN=elsewhere bash -lc 'echo $QUBES_GPG_DOMAIN'"
        assert in_qube(qvm, source, login).stdout == f"{target}\n"
        policy(f"qubes.Gpg * {source} {target} allow")
        # The window open, so that the keys qube answers without asking its screen.
        as_root(target, f"touch /run/qubes-gpg-split/stat.{source}")
        started = datetime.now(UTC)
        wrapped = in_qube(
            qvm, source, "env QUBES_GPG_DOMAIN=elsewhere qubes-gpg-client-wrapper --list-keys"
        )
        assert wrapped.returncode != 126
        [entry] = [e for e in audit_since(started) if e["source"] == source]
        assert (entry["target"], entry["decision"]) == (target, "allow")
    finally:
        as_root(source, "rm -f /rw/config/gpg-split-domain")
    none = "env -u QUBES_GPG_DOMAIN bash -lc 'echo $QUBES_GPG_DOMAIN'"
    assert in_qube(qvm, source, none).stdout == "@default\n"
    kept = "env QUBES_GPG_DOMAIN=chosen bash -lc 'echo $QUBES_GPG_DOMAIN'"
    assert in_qube(qvm, source, kept).stdout == "chosen\n"
