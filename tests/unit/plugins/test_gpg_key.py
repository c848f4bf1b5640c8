"""The gpg_key module, run by `ansible` as a play would run it, against real GnuPG homes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.plugins.gnupg import gpg, listed_primaries

ROOT = Path(__file__).resolve().parents[3]
PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")

pytestmark = pytest.mark.skipif(shutil.which("gpg") is None, reason="needs gpg")


def gnupg_home() -> Path:
    # gpg-agent's socket path must stay short: a home under /tmp, not under pytest's tmp_path.
    return Path(tempfile.mkdtemp(prefix="gk", dir="/tmp"))


@pytest.fixture
def home() -> Iterator[Path]:
    path = gnupg_home()
    yield path
    subprocess.run(["gpgconf", "--homedir", str(path), "--kill", "all"], check=False)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def keys() -> Iterator[dict[str, str]]:
    """Two keys made once: the fingerprints and armored texts of each, public and secret."""
    path = gnupg_home()
    made: dict[str, str] = {}
    for name in ("one", "two"):
        gpg(path, "--passphrase", "", "--quick-gen-key", f"{name} <{name}@example.org>",
            "ed25519", "sign", "never")  # fmt: skip
        made[name] = listed_primaries(
            gpg(path, "--with-colons", "--list-keys", f"={name} <{name}@example.org>")
        )[0]
        made[f"{name}.public"] = gpg(path, "--armor", "--export", made[name])
        made[f"{name}.secret"] = gpg(path, "--armor", "--export-secret-keys", made[name])
    yield made
    subprocess.run(["gpgconf", "--homedir", str(path), "--kill", "all"], check=False)
    shutil.rmtree(path, ignore_errors=True)


def held(home: Path, secret: bool = False) -> list[str]:
    listing = "--list-secret-keys" if secret else "--list-keys"
    return listed_primaries(gpg(home, "--with-colons", listing))


PLAY = """
- name: One gpg_key task
  hosts: localhost
  gather_facts: false
  tasks:
    - name: The task
      qubes_infra.build.gpg_key: "{{ arguments }}"
      register: outcome
      ignore_errors: true
    - name: Its result, for the test
      ansible.builtin.copy:
        content: "{{ outcome | to_json }}"
        dest: "{{ result_file }}"
        mode: "0600"
      check_mode: false
"""


def gpg_key(home: Path, *options: str, **arguments: object) -> dict[str, object]:
    """The module's result as a play registers it, with `rc` and what ansible-playbook printed."""
    with tempfile.TemporaryDirectory() as place:
        playbook, result_file = Path(place, "play.yml"), Path(place, "result.json")
        playbook.write_text(PLAY)
        variables = {
            "arguments": {"homedir": str(home), **arguments},
            "result_file": str(result_file),
            "ansible_python_interpreter": sys.executable,
        }
        run = subprocess.run(
            [
                str(PLAYBOOK),
                "-i",
                "localhost,",
                "-c",
                "local",
                "-e",
                json.dumps(variables),
                str(playbook),
                *options,
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg")},
            cwd=ROOT,
            timeout=120,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        outcome = json.loads(result_file.read_text())
    return {**outcome, "output": run.stdout}


def test_a_generated_key_is_made_once(home: Path) -> None:
    checked = gpg_key(home, "--check", generate_uid="keys <keys@example.org>", secret=True)
    assert checked["changed"] is True, checked["output"]
    assert held(home, secret=True) == []
    first = gpg_key(home, generate_uid="keys <keys@example.org>", secret=True, export=True)
    assert first["changed"] is True, first["output"]
    assert held(home, secret=True) == [first["fingerprint"]]
    assert str(first["public_key"]).startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")
    again = gpg_key(home, generate_uid="keys <keys@example.org>", secret=True)
    assert again["changed"] is False and again["fingerprint"] == first["fingerprint"]
    assert held(home, secret=True) == [first["fingerprint"]]


def test_a_public_key_is_imported_and_trusted_only_when_it_is_not(
    home: Path, keys: dict[str, str]
) -> None:
    wanted = {"fingerprint": keys["one"].lower(), "key": keys["one.public"], "trust": "ultimate"}
    checked = gpg_key(home, "--check", "--diff", **wanted)
    assert checked["changed"] is True, checked["output"]
    assert checked["diff"]["before"]["present"] is False
    assert checked["diff"]["after"] == {
        "fingerprint": keys["one"],
        "present": True,
        "secret": False,
        "trust": 6,
    }
    assert held(home) == []
    first = gpg_key(home, **wanted)
    assert first["changed"] is True and first["fingerprint"] == keys["one"], first["output"]
    assert held(home) == [keys["one"]] and held(home, secret=True) == []
    assert f"{keys['one']}:6:" in gpg(home, "--export-ownertrust")
    assert gpg_key(home, **wanted)["changed"] is False
    assert gpg_key(home, "--check", **wanted)["changed"] is False
    # Only the trust differs: only the trust changes.
    lowered = gpg_key(home, **{**wanted, "trust": "marginal"})
    assert lowered["changed"] is True
    assert f"{keys['one']}:4:" in gpg(home, "--export-ownertrust")


def test_a_secret_key_is_imported_when_only_its_public_half_is_there(
    home: Path, keys: dict[str, str]
) -> None:
    gpg(home, "--import", input=keys["two.public"])
    result = gpg_key(home, key=keys["two.secret"], secret=True)
    assert result["changed"] is True, result["output"]
    assert held(home, secret=True) == [keys["two"]]
    assert gpg_key(home, key=keys["two.secret"], secret=True)["changed"] is False


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"fingerprint": "ABC"}, "fingerprint: 'ABC' is not 40 hexadecimal digits"),
        ({"key": "two", "fingerprint": "one"}, "key: holds {two}, not fingerprint {one}"),
        ({"key": "one+two"}, "key: must hold exactly one primary key, holds 2"),
        ({"key": "one", "secret": True}, "key: secret is true, but key holds no secret key"),
        ({"fingerprint": "one", "secret": True}, "fingerprint: no secret key {one} here"),
    ],
)
def test_a_wrong_key_is_refused_naming_the_option_and_nothing_is_imported(
    home: Path, keys: dict[str, str], arguments: dict[str, object], message: str
) -> None:
    texts = {
        "one": keys["one.public"],
        "two": keys["two.public"],
        "one+two": keys["one.public"] + keys["two.public"],
    }
    given = dict(arguments)
    if "key" in given:
        given["key"] = texts[str(given["key"])]
    if given.get("fingerprint") in ("one", "two"):
        given["fingerprint"] = keys[str(given["fingerprint"])]
    result = gpg_key(home, **given)
    assert result["failed"] is True
    assert message.format(one=keys["one"], two=keys["two"]) in result["msg"]
    # What the user sees: the play prints the message with the task's failure.
    assert message.format(one=keys["one"], two=keys["two"]) in result["output"]
    assert held(home) == []
