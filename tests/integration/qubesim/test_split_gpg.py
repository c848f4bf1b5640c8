"""Split GPG: a client qube signs with a key that lives in a keys qube, inside the window or when
the person at the keys qube's screen says yes.

Conformance: qubes-app-linux-split-gpg (main; it has no release branches), qubes.Gpg.service: the
caller's stat file under /run/qubes-gpg-split newer than QUBES_GPG_AUTOACCEPT seconds (300 when
unset) lets the call through; otherwise it runs qubes.WaitForSession and asks `zenity --question`
"Do you allow VM 'CALLER' to access your GPG keys\n(now and for the following N units)?"; yes
touches the stat file, no (or a failed zenity) exits 1 before gpg-server runs, and the client
(src/multiplex.c, process_io) then reads end of input: it prints "EOF" and exits 1.
qubes.GpgImportKey.service imports with no question.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import (
    Policy,
    Qvm,
    answer,
    as_root,
    pending_question,
    questions,
)

DATA = "release 4.3 payload\n"


@pytest.fixture
def split_gpg(qvm: Qvm, new_name: Callable[[], str], policy: Policy) -> tuple[str, str, str]:
    """(client, keys qube, key fingerprint); policy lets the client, only, use the keys qube."""
    client, keys = new_name(), new_name()
    for name in (client, keys):
        qvm("qvm-create", "--label", "black", "--property", "netvm=", name)
    qvm(
        "qvm-run",
        "--pass-io",
        keys,
        "gpg --batch --passphrase '' --quick-gen-key 'Test Signer <signer@example.org>'"
        " ed25519 sign never 2>/dev/null",
    )
    fingerprint = qvm(
        "qvm-run",
        "--pass-io",
        keys,
        "gpg --with-colons --list-secret-keys | awk -F: '/^fpr/ {print $10; exit}'",
    ).stdout.strip()
    as_root(
        client,
        f"echo {keys} > /rw/config/gpg-split-domain",
    )
    policy(f"qubes.Gpg * {client} {keys} allow", f"qubes.Gpg * @anyvm {keys} deny")
    return client, keys, fingerprint


def open_window(qvm: Qvm, keys: str, client: str, age: str = "now") -> None:
    as_root(
        keys,
        f"mkdir -p /run/qubes-gpg-split && touch -d '{age}' /run/qubes-gpg-split/stat.{client}",
    )


def window_is_open(keys: str, client: str) -> bool:
    found = as_root(keys, f"test -e /run/qubes-gpg-split/stat.{client}", check=False)
    return found.returncode == 0


def sign(
    qvm: Qvm, client: str, fingerprint: str, *options: str
) -> subprocess.CompletedProcess[str]:
    command = " ".join(["qubes-gpg-client", "--local-user", fingerprint, *options])
    return qvm("qvm-run", "--pass-io", client, command, input=DATA, check=False)


Background = Callable[..., subprocess.Popen[str]]


@pytest.fixture
def background() -> Iterator[Background]:
    """Sign requests that wait for an answer, run in the background; killed if a test leaves one."""
    started: list[subprocess.Popen[str]] = []

    def sign_later(client: str, key: str, *, environment: str = "") -> subprocess.Popen[str]:
        command = f"{environment} qubes-gpg-client --local-user {key} --detach-sign -a"
        data, feed = os.pipe()
        os.write(feed, DATA.encode())  # fits in the pipe
        os.close(feed)
        process = subprocess.Popen(
            ["qvm-run", "--pass-io", client, command.strip()],
            stdin=data,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.close(data)
        started.append(process)
        return process

    yield sign_later
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate()


def still_waiting(process: subprocess.Popen[str]) -> bool:
    time.sleep(1)
    return process.poll() is None


def question_text(client: str, length: str) -> str:
    return (
        f"Do you allow VM '{client}' to access your GPG keys\n(now and for the following {length})?"
    )


def test_signs_inside_the_window(qvm: Qvm, split_gpg: tuple[str, str, str], tmp_path: Path) -> None:
    client, keys, fingerprint = split_gpg
    open_window(qvm, keys, client)
    signed = sign(qvm, client, fingerprint, "--detach-sign", "--armor")
    assert signed.returncode == 0, signed.stderr
    assert signed.stdout.startswith("-----BEGIN PGP SIGNATURE-----")
    # The signature verifies, in dom0, against the public key exported from the keys qube.
    public = qvm("qvm-run", "--pass-io", keys, f"gpg --export --armor {fingerprint}").stdout
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    environment = {**os.environ, "GNUPGHOME": str(home)}
    subprocess.run(
        ["gpg", "--batch", "--import"],
        input=public,
        text=True,
        env=environment,
        check=True,
        capture_output=True,
    )
    (tmp_path / "data").write_text(DATA)
    (tmp_path / "data.asc").write_text(signed.stdout)
    verified = subprocess.run(
        [
            "gpg",
            "--batch",
            "--status-fd",
            "1",
            "--verify",
            str(tmp_path / "data.asc"),
            str(tmp_path / "data"),
        ],
        env=environment,
        capture_output=True,
        text=True,
    )
    assert f"VALIDSIG {fingerprint}" in verified.stdout


def test_outside_the_window_the_keys_qube_asks_and_the_call_waits_for_a_yes(
    qvm: Qvm, split_gpg: tuple[str, str, str], background: Background
) -> None:
    # qubes.Gpg.service: the stat file is older than QUBES_GPG_AUTOACCEPT (here: missing), so it
    # asks zenity --question naming the caller; zenity waits for as long as nobody answers.
    client, keys, fingerprint = split_gpg
    waiting = background(client, fingerprint)
    question = pending_question(keys)
    assert (question["qube"], question["caller"]) == (keys, client)
    assert question["text"] == question_text(client, "5 minutes")
    assert still_waiting(waiting)
    assert [q["id"] for q in questions(keys)] == [question["id"]]
    assert not window_is_open(keys, client)
    # yes: `touch` opens the window, then gpg-server signs.
    answer(question["id"], "yes")
    signed, error = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, error
    assert signed.startswith("-----BEGIN PGP SIGNATURE-----")
    assert [q["state"] for q in questions(keys)] == ["yes"]
    assert window_is_open(keys, client)
    # Within the window nothing is asked.
    again = sign(qvm, client, fingerprint, "--detach-sign", "--armor")
    assert again.returncode == 0, again.stderr
    assert len(questions(keys)) == 1


def test_a_no_refuses_before_gpg_runs_and_the_client_prints_eof(
    split_gpg: tuple[str, str, str], background: Background
) -> None:
    # qubes.Gpg.service: `zenity ... || exit 1`, before gpg-server; the client reads end of input
    # (src/multiplex.c, process_io): "EOF", exit 1. The window stays closed.
    client, keys, fingerprint = split_gpg
    waiting = background(client, fingerprint)
    question = pending_question(keys)
    answer(question["id"], "no")
    output, error = waiting.communicate(timeout=120)
    assert (waiting.returncode, output, error) == (1, "", "EOF\n")
    assert [q["state"] for q in questions(keys)] == ["no"]
    assert not window_is_open(keys, client)


def test_inside_the_window_nothing_is_asked(qvm: Qvm, split_gpg: tuple[str, str, str]) -> None:
    client, keys, fingerprint = split_gpg
    open_window(qvm, keys, client, age="299 seconds ago")
    signed = sign(qvm, client, fingerprint, "--detach-sign", "--armor")
    assert signed.returncode == 0, signed.stderr
    assert questions(keys) == []


def test_an_expired_window_asks_again(
    qvm: Qvm, split_gpg: tuple[str, str, str], background: Background
) -> None:
    client, keys, fingerprint = split_gpg
    open_window(qvm, keys, client, age="301 seconds ago")
    waiting = background(client, fingerprint)
    answer(pending_question(keys)["id"], "no")
    output, _ = waiting.communicate(timeout=120)
    assert (waiting.returncode, output) == (1, "")


def test_the_window_length_comes_from_the_keys_qube(
    qvm: Qvm, split_gpg: tuple[str, str, str], background: Background
) -> None:
    client, keys, fingerprint = split_gpg
    qvm("qvm-run", "--pass-io", keys, "echo 'export QUBES_GPG_AUTOACCEPT=3600' >> ~/.profile")
    open_window(qvm, keys, client, age="1000 seconds ago")
    assert sign(qvm, client, fingerprint, "--detach-sign", "--armor").returncode == 0
    assert questions(keys) == []
    # The client cannot widen the window: its environment does not reach the backend, which asks
    # and names its own window (qubes.Gpg.service, unit()).
    open_window(qvm, keys, client, age="7200 seconds ago")
    waiting = background(client, fingerprint, environment="QUBES_GPG_AUTOACCEPT=99999")
    question = pending_question(keys)
    assert question["text"] == question_text(client, "1 hour")
    answer(question["id"], "no")
    waiting.communicate(timeout=120)
    assert waiting.returncode == 1


def test_a_key_import_asks_nothing(
    qvm: Qvm, split_gpg: tuple[str, str, str], policy: Policy
) -> None:
    # qubes.GpgImportKey.service: gpg2 --no-tty --import, with no window and no question.
    client, keys, _ = split_gpg
    policy(f"qubes.GpgImportKey * {client} {keys} allow", name="29-qubesim-import.policy")
    qvm(
        "qvm-run",
        "--pass-io",
        client,
        "gpg --batch --passphrase '' --quick-gen-key 'Imported <imported@example.org>'"
        " ed25519 sign never 2>/dev/null && gpg --armor --export imported@example.org"
        " | qubes-gpg-client-wrapper --import",
    )
    listed = qvm("qvm-run", "--pass-io", keys, "gpg --list-keys imported@example.org")
    assert "Imported <imported@example.org>" in listed.stdout
    assert questions(keys) == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--cipher-algo", "AES256", "-s"], "Forbidden option: --cipher-algo"),
        (["--command-fd", "0", "-s"], "Forbidden option: --command-fd"),
        (["--no-such-option"], "Unknown option"),
        (["-s", "--output", "/home/user/x"], "--output may only be '-'"),
    ],
)
def test_refuses_forbidden_options(
    qvm: Qvm, split_gpg: tuple[str, str, str], options: list[str], message: str
) -> None:
    client, keys, fingerprint = split_gpg
    open_window(qvm, keys, client)
    refused = sign(qvm, client, fingerprint, *options)
    assert refused.returncode == 1
    assert message in refused.stderr


def test_another_qube_cannot_use_the_keys(
    qvm: Qvm, split_gpg: tuple[str, str, str], new_name: Callable[[], str]
) -> None:
    _, keys, fingerprint = split_gpg
    intruder = new_name()
    qvm("qvm-create", "--label", "red", "--property", "netvm=", intruder)
    open_window(qvm, keys, intruder)
    command = f"qubes-gpg-client --local-user {fingerprint} --detach-sign -a"
    result = qvm(
        "qvm-run",
        "--pass-io",
        intruder,
        f"QUBES_GPG_DOMAIN={keys} {command}",
        input=DATA,
        check=False,
    )
    assert result.returncode == 1
    assert "EOF" in result.stderr
