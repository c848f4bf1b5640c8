# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The shape of a signed GitHub command, checked before any cryptography sees it.

A command is an inline-signed OpenPGP message (as `gpg --clearsign` writes it) whose signed text
is exactly one line, in qubes-builderv2-github's grammar:

    Upload-component RELEASE COMPONENT COMMIT {current|security-testing} DISTRIBUTION...
    Build-template RELEASE TEMPLATE TIMESTAMP
    Upload-template RELEASE TEMPLATE VERSION-TIMESTAMP {templates-itl|templates-community}
    Build-iso RELEASE VERSION TIMESTAMP

RELEASE is `rN.M`; COMMIT 40 hex digits; the distributions are `all` or one or more words
`host-NAME` / `vm-NAME` (as qubes-builderv2-github's parse-command checks them); TIMESTAMP is UTC
`%Y%m%d%H%M`. Anything else is refused here with the
rule it breaks: bounded size, ASCII only, one `Hash:` header, one command line of at most 255
bytes, one signature block of armour lines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qubes_infra_services.definitions import COMPONENT_RULE, is_component

# Every rule is matched whole (fullmatch): `$` would let a trailing newline through.
MAX_MESSAGE_BYTES = 8192
MAX_COMMAND_BYTES = 255
BEGIN_MESSAGE = "-----BEGIN PGP SIGNED MESSAGE-----"
BEGIN_SIGNATURE = "-----BEGIN PGP SIGNATURE-----"
END_SIGNATURE = "-----END PGP SIGNATURE-----"
HASH_HEADER = re.compile(r"Hash: (SHA256|SHA384|SHA512)")
ARMOUR_HEADER = re.compile(r"(Version|Comment): [\x20-\x7e]{0,200}")
ARMOUR_LINE = re.compile(r"[A-Za-z0-9+/]{1,76}={0,2}")
ARMOUR_CHECKSUM = re.compile(r"=[A-Za-z0-9+/]{4}")
COMMAND_LINE = re.compile(r"[A-Za-z0-9_.-]+( [A-Za-z0-9_.-]+)*")

RELEASE = re.compile(r"r[0-9]{1,3}(\.[0-9]{1,3}){1,2}")
TEMPLATE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
COMMIT = re.compile(r"[0-9a-f]{40}")
DISTRIBUTION = re.compile(r"(host|vm)-[a-z][A-Za-z0-9_-]{0,63}")
TIMESTAMP = re.compile(r"[0-9]{12}")
TEMPLATE_VERSION = re.compile(r"[0-9]{1,3}(\.[0-9]{1,3}){0,3}-[0-9]{12}")
ISO_VERSION = re.compile(r"[0-9][0-9A-Za-z.-]{0,31}")
COMPONENT_REPOSITORIES = ("current", "security-testing")
TEMPLATE_REPOSITORIES = ("templates-itl", "templates-community")


class Malformed(Exception):
    """The input breaks the grammar; the message names the rule."""


class Unsigned(Malformed):
    """The input is not an inline-signed message at all."""


@dataclass(frozen=True)
class Command:
    kind: str
    release: str
    line: str
    component: str = ""
    commit: str = ""
    repository: str = ""
    distributions: tuple[str, ...] = ()
    template: str = ""
    version: str = ""
    timestamp: str = ""

    @property
    def all_distributions(self) -> bool:
        return self.distributions == ("all",)


def _signature_block(lines: list[str]) -> None:
    """The armoured signature: optional headers, a blank line, base64, optional checksum."""
    if not lines or lines[-1] != END_SIGNATURE:
        raise Malformed(f"the signature block does not end with {END_SIGNATURE}")
    body = lines[:-1]
    while body and ARMOUR_HEADER.fullmatch(body[0]):
        body.pop(0)
    if not body or body.pop(0) != "":
        raise Malformed("the signature block has no blank line after its headers")
    if body and ARMOUR_CHECKSUM.fullmatch(body[-1]):
        body.pop()
    if not body or not all(ARMOUR_LINE.fullmatch(line) for line in body):
        raise Malformed("the signature block is not base64 armour")


def parse_message(data: bytes) -> tuple[str, bytes]:
    """The command line of a well-formed inline-signed message, and the message itself in the
    canonical form given to gpgv (LF line ends, one final LF)."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise Malformed(f"the input is over {MAX_MESSAGE_BYTES} bytes")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise Malformed("the input is not ASCII") from None
    lines = text.replace("\r\n", "\n").rstrip("\n").split("\n")
    if not lines or lines[0] != BEGIN_MESSAGE or BEGIN_SIGNATURE not in lines:
        raise Unsigned("the input is not an inline-signed OpenPGP message")
    if len(lines) < 5 or not HASH_HEADER.fullmatch(lines[1]) or lines[2] != "":
        raise Malformed("the signed message must start with one Hash: header and a blank line")
    if lines[4] != BEGIN_SIGNATURE:
        raise Malformed("the signed text must be exactly one command line")
    command = lines[3]
    if len(command) > MAX_COMMAND_BYTES:
        raise Malformed(f"the command line is over {MAX_COMMAND_BYTES} bytes")
    if not COMMAND_LINE.fullmatch(command) or any(word[0] == "-" for word in command.split(" ")):
        raise Malformed(
            "the command line must be words of [A-Za-z0-9_.-] separated by single spaces,"
            " none starting with '-'"
        )
    _signature_block(lines[5:])
    return command, ("\n".join(lines) + "\n").encode("ascii")


def _check(rule: re.Pattern[str], value: str, what: str) -> str:
    if not rule.fullmatch(value):
        raise Malformed(f"{what} {value!r} does not match {rule.pattern}")
    return value


def _component(value: str) -> str:
    if not is_component(value):
        raise Malformed(f"component {value!r} breaks the rule: {COMPONENT_RULE}")
    return value


def _distributions(words: list[str]) -> tuple[str, ...]:
    if words == ["all"]:
        return ("all",)
    for name in words:
        _check(DISTRIBUTION, name, "distribution")
    if len(set(words)) != len(words):
        raise Malformed(f"distributions {' '.join(words)!r} name one twice")
    return tuple(words)


def _one_of(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise Malformed(f"{what} {value!r} is not one of {', '.join(choices)}")
    return value


def parse_command(line: str) -> Command:
    """The command of a command line, every word checked against its rule."""
    kind, *words = line.split(" ")
    arity = {"Upload-component": 5, "Build-template": 3, "Upload-template": 4, "Build-iso": 3}
    if kind not in arity:
        raise Malformed(f"unknown command {kind[:40]!r} (known: {', '.join(arity)})")
    # Upload-component ends with one or more distributions.
    if len(words) != arity[kind] and not (kind == "Upload-component" and len(words) > 5):
        raise Malformed(f"{kind} takes {arity[kind]} arguments, not {len(words)}")
    common = {"kind": kind, "release": _check(RELEASE, words[0], "release"), "line": line}
    if kind == "Upload-component":
        return Command(
            **common,
            component=_component(words[1]),
            commit=_check(COMMIT, words[2], "commit"),
            repository=_one_of(words[3], COMPONENT_REPOSITORIES, "repository"),
            distributions=_distributions(words[4:]),
        )
    if kind == "Build-template":
        template = _check(TEMPLATE, words[1], "template")
        return Command(
            **common, template=template, timestamp=_check(TIMESTAMP, words[2], "timestamp")
        )
    if kind == "Upload-template":
        return Command(
            **common,
            template=_check(TEMPLATE, words[1], "template"),
            version=_check(TEMPLATE_VERSION, words[2], "template version"),
            repository=_one_of(words[3], TEMPLATE_REPOSITORIES, "repository"),
        )
    version = _check(ISO_VERSION, words[1], "iso version")
    return Command(**common, version=version, timestamp=_check(TIMESTAMP, words[2], "timestamp"))
