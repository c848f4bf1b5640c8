# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The primary fingerprints of OpenPGP keys: as `gpg --with-colons` lists them, and as ASCII
armour carries them.

The one reading of keys for the gpg_key module (in a qube), the verify report and the
gpg_fingerprints filter (on the controller). Both texts may come from a qube: they are bounded,
parsed and never evaluated; a malformed armour is refused naming the rule it breaks.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re

# v4 keys have 40 hex digits, v5 and v6 keys 64.
FINGERPRINT = re.compile(r"(?:[0-9A-F]{40}|[0-9A-F]{64})\Z")
MAX_ARMOR = 1 << 20  # characters of armour read: far above any key the collection handles
ARMOR = re.compile(
    r"^-----BEGIN PGP PUBLIC KEY BLOCK-----[ \t]*\r?\n(.*?)^-----END PGP PUBLIC KEY BLOCK-----",
    re.DOTALL | re.MULTILINE,
)
PUBLIC_KEY_PACKET = 6  # the primary key's packet; subkeys (14) and the rest are skipped
# What each key version hashes into its fingerprint (RFC 4880 12.2, LibrePGP, RFC 9580 5.5.4).
FINGERPRINT_HASH = {4: (b"\x99", 2, "sha1"), 5: (b"\x9a", 4, "sha256"), 6: (b"\x9b", 4, "sha256")}


class ArmorError(ValueError):
    """An armoured text that is not one or more OpenPGP public key blocks."""


def listed_primaries(listing: str) -> list[str]:
    """The primary fingerprints of a `gpg --with-colons` listing, in order: the fpr record
    right after each pub or sec record (in --list-secret-keys, also a key whose primary secret
    part is elsewhere but a secret subkey is here: it can still sign)."""
    found: list[str] = []
    primary = False
    for fields in (line.split(":") for line in listing.splitlines()):
        if fields[0] in ("pub", "sec", "sub", "ssb"):
            primary = fields[0] in ("pub", "sec")
        elif fields[0] == "fpr" and primary:
            candidate = fields[9].upper() if len(fields) > 9 else ""
            if FINGERPRINT.match(candidate):
                found.append(candidate)
            primary = False
    return found


def armored_primaries(text: str) -> list[str]:
    """The primary fingerprints of every public key in the `PGP PUBLIC KEY BLOCK`s of `text`,
    computed from the key packets (no keyring, no gpg)."""
    if len(text) > MAX_ARMOR:
        raise ArmorError(f"armour longer than {MAX_ARMOR} characters")
    blocks = ARMOR.findall(text)
    if not blocks:
        raise ArmorError("no -----BEGIN PGP PUBLIC KEY BLOCK----- ... END block")
    return [fingerprint for block in blocks for fingerprint in _block_primaries(block)]


def _block_primaries(block: str) -> list[str]:
    data = _dearmor(block)
    found = []
    for tag, body in _packets(data):
        if tag == PUBLIC_KEY_PACKET:
            found.append(_fingerprint(body))
    if not found:
        raise ArmorError("a public key block holds no public key packet")
    return found


def _dearmor(block: str) -> bytes:
    """The bytes of one block's body: armour headers up to the first empty line, base64 lines,
    then an optional =CRC24 line that must match."""
    lines = [line.strip() for line in block.splitlines()]
    if "" in lines:
        lines = lines[lines.index("") + 1 :]
    checksums = [line[1:] for line in lines if line.startswith("=")]
    encoded = "".join(line for line in lines if line and not line.startswith("="))
    try:
        data = base64.b64decode(encoded, validate=True)
        given = base64.b64decode(checksums[0], validate=True) if checksums else None
    except binascii.Error:
        raise ArmorError("a public key block is not base64") from None
    if given is not None and given != _crc24(data).to_bytes(3, "big"):
        raise ArmorError("a public key block's checksum does not match its data")
    return data


def _crc24(data: bytes) -> int:
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _bit in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


def _packets(data: bytes) -> list[tuple[int, bytes]]:
    """The (tag, body) of each packet, old or new format (RFC 9580 4.2)."""
    packets, position = [], 0
    while position < len(data):
        head = data[position]
        if not head & 0x80:
            raise ArmorError(f"byte {position} of a key block does not start a packet")
        if head & 0x40:
            tag, (length, position) = head & 0x3F, _new_length(data, position + 1)
        else:
            tag, size = (head >> 2) & 0x0F, head & 0x03
            if size == 3:  # indeterminate: to the end of the data
                length, position = len(data) - position - 1, position + 1
            else:
                width = 1 << size
                length = int.from_bytes(data[position + 1 : position + 1 + width], "big")
                position += 1 + width
        if position + length > len(data):
            raise ArmorError("a packet of a key block runs past its end")
        packets.append((tag, data[position : position + length]))
        position += length
    return packets


def _new_length(data: bytes, position: int) -> tuple[int, int]:
    """A new-format body length and where the body starts; key packets have no partial length."""
    first = data[position] if position < len(data) else 0
    if first < 192:
        return first, position + 1
    if first < 224 and position + 1 < len(data):
        return ((first - 192) << 8) + data[position + 1] + 192, position + 2
    if first == 255 and position + 4 < len(data):
        return int.from_bytes(data[position + 1 : position + 5], "big"), position + 5
    raise ArmorError("a packet of a key block has a partial or truncated length")


def _fingerprint(body: bytes) -> str:
    version = body[0] if body else 0
    if version not in FINGERPRINT_HASH:
        raise ArmorError(f"a primary key is of version {version}; versions 4, 5 and 6 are read")
    prefix, width, algorithm = FINGERPRINT_HASH[version]
    digest = hashlib.new(algorithm, prefix + len(body).to_bytes(width, "big") + body)
    return digest.hexdigest().upper()
