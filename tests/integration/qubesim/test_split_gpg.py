"""Split GPG: a client qube signs with a key that lives in a keys qube, only inside the window."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import Policy, Qvm, as_root

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


def sign(
    qvm: Qvm, client: str, fingerprint: str, *options: str
) -> subprocess.CompletedProcess[str]:
    command = " ".join(["qubes-gpg-client", "--local-user", fingerprint, *options])
    return qvm("qvm-run", "--pass-io", client, command, input=DATA, check=False)


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


def test_refuses_outside_the_window(qvm: Qvm, split_gpg: tuple[str, str, str]) -> None:
    client, _, fingerprint = split_gpg
    refused = sign(qvm, client, fingerprint, "--detach-sign", "--armor")
    assert refused.returncode == 1
    assert "BEGIN PGP" not in refused.stdout
    assert "refused" in refused.stderr


def test_refuses_when_the_window_has_expired(qvm: Qvm, split_gpg: tuple[str, str, str]) -> None:
    client, keys, fingerprint = split_gpg
    open_window(qvm, keys, client, age="301 seconds ago")
    refused = sign(qvm, client, fingerprint, "--detach-sign", "--armor")
    assert refused.returncode == 1
    assert refused.stdout == ""


def test_the_window_length_comes_from_the_keys_qube(
    qvm: Qvm, split_gpg: tuple[str, str, str]
) -> None:
    client, keys, fingerprint = split_gpg
    qvm("qvm-run", "--pass-io", keys, "echo 'export QUBES_GPG_AUTOACCEPT=3600' >> ~/.profile")
    open_window(qvm, keys, client, age="1000 seconds ago")
    assert sign(qvm, client, fingerprint, "--detach-sign", "--armor").returncode == 0
    # The client cannot widen the window: its environment does not reach the backend.
    open_window(qvm, keys, client, age="7200 seconds ago")
    command = (
        f"QUBES_GPG_AUTOACCEPT=99999 qubes-gpg-client --local-user {fingerprint} --detach-sign -a"
    )
    assert qvm("qvm-run", "--pass-io", client, command, input=DATA, check=False).returncode == 1


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
