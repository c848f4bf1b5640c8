# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Who signed a command: gpgv against the trusted-keys keyring, read from its status lines.

gpgv runs with an empty home of its own, so only the keyring the build_vm role built counts.
The signer is the primary key fingerprint of the one good signature (VALIDSIG's last field, as
qubes-builder-github takes it); a message with another number of signatures is refused.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass

GPGV_TIMEOUT = 60
MAX_STATUS_BYTES = 1 << 16
# Signature class 0x01: a signature of a canonical text document (what --clearsign makes).
TEXT_SIGNATURE = "01"
REFUSING_STATUS = {
    "BADSIG": "bad signature",
    "EXPSIG": "bad signature: the signature has expired",
    "EXPKEYSIG": "bad signature: the signing key has expired",
    "REVKEYSIG": "bad signature: the signing key is revoked",
}


class SignatureRefused(Exception):
    """The message's signature does not make it a command; the text says why."""


@dataclass(frozen=True)
class Signature:
    signer: str
    created: int


def _gpgv(message: bytes, keyring: str) -> tuple[int, list[list[str]]]:
    with tempfile.TemporaryDirectory(prefix="github-command-") as home:
        path = os.path.join(home, "command.asc")
        with open(path, "wb") as out:
            out.write(message)
        try:
            result = subprocess.run(
                ["gpgv", "--status-fd", "1", "--keyring", keyring, path],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                env={
                    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    "GNUPGHOME": home,
                    "LC_ALL": "C",
                },
                timeout=GPGV_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise SignatureRefused(f"bad signature: gpgv took over {GPGV_TIMEOUT}s") from None
    status = result.stdout[:MAX_STATUS_BYTES].decode("ascii", "replace")
    words = [line.split(" ") for line in status.splitlines() if line.startswith("[GNUPG:] ")]
    return result.returncode, [word[1:] for word in words if len(word) > 1]


def verify(message: bytes, keyring: str) -> Signature:
    """The signer and creation time of the message's one good signature, or SignatureRefused."""
    if not os.path.isfile(keyring):
        raise SignatureRefused(f"untrusted signer: there is no trusted keyring {keyring}")
    code, statuses = _gpgv(message, keyring)
    kinds = [status[0] for status in statuses]
    if kinds.count("NEWSIG") > 1:
        raise SignatureRefused("bad signature: more than one signature")
    for kind, reason in REFUSING_STATUS.items():
        if kind in kinds:
            raise SignatureRefused(reason)
    missing = next((status for status in statuses if status[0] == "NO_PUBKEY"), None)
    if missing is not None:
        key = missing[1] if len(missing) > 1 else "?"
        raise SignatureRefused(f"untrusted signer: key {key} is not in the trusted keyring")
    valid = [status for status in statuses if status[0] == "VALIDSIG"]
    if code != 0 or "GOODSIG" not in kinds or len(valid) != 1 or len(valid[0]) < 11:
        raise SignatureRefused("bad signature")
    fields = valid[0]
    if fields[9] != TEXT_SIGNATURE or not fields[3].isdigit():
        raise SignatureRefused("bad signature: not a text signature made by --clearsign")
    return Signature(signer=fields[10].upper(), created=int(fields[3]))
