"""The gpg_fingerprints filter (and the reading of listings it shares with the gpg_key module and
the verify report), against what a real gpg exports and lists."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from ansible.errors import AnsibleFilterError
from ansible_collections.qubes_infra.build.plugins.filter.gpg import gpg_fingerprints
from ansible_collections.qubes_infra.build.plugins.module_utils.openpgp import MAX_ARMOR

from tests.unit.plugins.gnupg import gpg, listed_primaries

pytestmark = pytest.mark.skipif(shutil.which("gpg") is None, reason="needs gpg")


@pytest.fixture(scope="module")
def homes() -> Iterator[dict[str, Path]]:
    # gpg-agent's socket path must stay short: homes under /tmp, not under pytest's tmp_path.
    made = {name: Path(tempfile.mkdtemp(prefix="gf", dir="/tmp")) for name in ("keys", "other")}
    yield made
    for path in made.values():
        subprocess.run(["gpgconf", "--homedir", str(path), "--kill", "all"], check=False)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def keys(homes: dict[str, Path]) -> dict[str, str]:
    """Three primary keys of different algorithms, two with an encryption subkey."""
    home = homes["keys"]
    made = {}
    for name, algorithm, usage in (
        ("ed", "ed25519", "sign"),
        ("edsub", "ed25519", "sign"),
        ("rsa", "rsa2048", "sign"),
    ):
        uid = f"{name} <{name}@example.org>"
        gpg(home, "--passphrase", "", "--quick-gen-key", uid, algorithm, usage, "never")
        made[name] = listed_primaries(gpg(home, "--with-colons", "--list-keys", f"={uid}"))[0]
    gpg(home, "--passphrase", "", "--quick-add-key", made["edsub"], "cv25519", "encr", "never")
    gpg(home, "--passphrase", "", "--quick-add-key", made["rsa"], "rsa2048", "encr", "never")
    return made


def test_an_armoured_key_gives_its_primary_fingerprint_as_gpg_computes_it(
    homes: dict[str, Path], keys: dict[str, str]
) -> None:
    for name in ("ed", "edsub", "rsa"):
        armour = gpg(homes["keys"], "--armor", "--export", keys[name])
        shown = gpg(homes["other"], "--with-colons", "--show-keys", input=armour)
        assert gpg_fingerprints(armour) == listed_primaries(shown) == [keys[name]]


def test_every_primary_key_of_every_block_counts_subkeys_do_not(
    homes: dict[str, Path], keys: dict[str, str]
) -> None:
    together = gpg(homes["keys"], "--armor", "--export", keys["rsa"], keys["edsub"])
    apart = together + "\n" + gpg(homes["keys"], "--armor", "--export", keys["ed"])
    expected = listed_primaries(gpg(homes["other"], "--with-colons", "--show-keys", input=apart))
    assert sorted(expected) == sorted(keys.values())
    assert gpg_fingerprints(apart) == expected


def test_a_listing_gives_the_primary_fingerprints_of_its_pub_and_sec_records(
    homes: dict[str, Path], keys: dict[str, str]
) -> None:
    public = gpg(homes["keys"], "--with-colons", "--list-keys")
    secret = gpg(homes["keys"], "--with-colons", "--list-secret-keys")
    assert sorted(gpg_fingerprints(public)) == sorted(keys.values())
    assert gpg_fingerprints(secret) == gpg_fingerprints(public)
    assert gpg_fingerprints("") == []


def test_a_key_whose_primary_secret_is_elsewhere_is_held_when_a_secret_subkey_is(
    homes: dict[str, Path], keys: dict[str, str]
) -> None:
    # What --export-secret-subkeys made (an offline primary key) still signs with its subkey.
    subkeys_only = gpg(homes["keys"], "--armor", "--export-secret-subkeys", keys["edsub"])
    gpg(homes["other"], "--import", input=subkeys_only)
    listing = gpg(homes["other"], "--with-colons", "--list-secret-keys")
    assert listing.split(":")[14] == "#"  # the primary's secret part is not here
    assert gpg_fingerprints(listing) == [keys["edsub"]]


def corrupted(armour: str) -> str:
    """The armour with one base64 character of the key data changed (the checksum no longer
    matches)."""
    lines = armour.splitlines()
    index = lines.index("") + 2
    line = lines[index]
    lines[index] = ("B" if line[0] == "A" else "A") + line[1:]
    return "\n".join(lines)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda home, key: gpg(home, "--armor", "--export-secret-keys", key),
         "no -----BEGIN PGP PUBLIC KEY BLOCK----- ... END block"),
        (lambda home, key: corrupted(gpg(home, "--armor", "--export", key)),
         "a public key block's checksum does not match its data"),
        (lambda home, key: gpg(home, "--armor", "--export", key).replace("\n=", "\n*=", 1),
         "a public key block is not base64"),
        (lambda home, key: gpg(home, "--armor", "--export", key) + "#" * MAX_ARMOR,
         f"armour longer than {MAX_ARMOR} characters"),
    ],
)  # fmt: skip
def test_a_text_that_is_no_public_key_armour_is_refused_naming_the_rule(
    homes: dict[str, Path], keys: dict[str, str], make: object, message: str
) -> None:
    text = make(homes["keys"], keys["ed"])  # type: ignore[operator]
    with pytest.raises(AnsibleFilterError, match=f"^gpg_fingerprints: {re.escape(message)}$"):
        gpg_fingerprints(text)


def test_what_is_not_text_is_refused() -> None:
    with pytest.raises(AnsibleFilterError, match=r"takes text \(.*\), not list$"):
        gpg_fingerprints(["-----BEGIN PGP PUBLIC KEY BLOCK-----"])
