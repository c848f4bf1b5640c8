# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""qubesbuilder.ProcessGithubCommand: run a command a maintainer signed in a GitHub comment.

Run by /usr/local/etc/qubes-rpc/qubesbuilder.ProcessGithubCommand in a build qube; dom0 lets the
net qube call it with the signed message on stdin. The checks, in this order, each refusal one
line of ~/builder-github-logs/<epoch>-<pid>.log saying why, and nothing run:

1. size and grammar (command_grammar), before any cryptography: "malformed ..." / "unsigned ...";
2. the signature, with gpgv against the trusted-keys keyring: "bad signature ...",
   "untrusted signer ..." (also for a key in the keyring that the settings do not list);
3. the signer's authorisation for this command (components, distributions, templates, iso):
   "not authorised ...";
4. freshness: the signature must be younger than the age limit, and Build-template / Build-iso
   timestamps within [now - 1 hour, now + 5 minutes] as upstream: "stale ...";
5. once only (used_commands): "replayed".

An accepted command runs, detached and under each builder's lock, in every builder of its
release that takes it (builder_actions); its output goes to <same>-<name>-<release>.log.
"""

from __future__ import annotations

import calendar
import sys
import time
from typing import Any

from qubes_infra_services.builder_actions import NotForThisBuilder, command_steps
from qubes_infra_services.builder_instances import (
    ServiceLog,
    action_environment,
    caller,
    ignore_input,
    load_config,
    read_builders,
    start_detached,
)
from qubes_infra_services.command_grammar import (
    MAX_MESSAGE_BYTES,
    Command,
    Malformed,
    Unsigned,
    parse_command,
    parse_message,
)
from qubes_infra_services.command_signature import Signature, SignatureRefused, verify
from qubes_infra_services.used_commands import StoreError, command_key, consume

FUTURE_SKEW = 5 * 60
TIMESTAMP_MAX_AGE = 60 * 60
ALL = "_all_"


class Refused(Exception):
    """The command is not run; the text is the log line's reason."""


def read_input(stream: Any) -> bytes:
    """At most one byte more than a message may have: enough to tell it is too long."""
    data = b""
    while len(data) <= MAX_MESSAGE_BYTES:
        chunk = stream.read(MAX_MESSAGE_BYTES + 1 - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _allowed(granted: Any, wanted: str) -> bool:
    return granted == ALL or (isinstance(granted, list) and (ALL in granted or wanted in granted))


def authorised_distributions(command: Command, rights: dict[str, Any]) -> tuple[str, ...] | None:
    """The distributions an Upload-component acts on (None: all of the builder's), or Refused."""
    granted = rights.get("distributions", [])
    if command.all_distributions:
        if _allowed(granted, ALL):
            return None
        if not granted:
            raise Refused("not authorised: the signer may upload to no distribution")
        return tuple(granted)
    denied = [name for name in command.distributions if not _allowed(granted, name)]
    if denied:
        raise Refused(f"not authorised for distribution {', '.join(denied)}")
    return command.distributions


def authorise(command: Command, signer: str, signers: dict[str, Any]) -> tuple[str, ...] | None:
    """Refused unless the signer may give this command; the distributions it acts on."""
    rights = signers.get(signer)
    if not isinstance(rights, dict):
        raise Refused(f"untrusted signer {signer}: not a command signer of this build qube")
    if command.kind == "Upload-component":
        if not _allowed(rights.get("components", []), command.component):
            raise Refused(f"not authorised: {signer} may not upload component {command.component}")
        return authorised_distributions(command, rights)
    if command.kind in ("Build-template", "Upload-template"):
        if not _allowed(rights.get("templates", []), command.template):
            raise Refused(f"not authorised: {signer} may not {command.kind} {command.template}")
        return None
    if rights.get("iso") is not True:
        raise Refused(f"not authorised: {signer} may not build ISOs")
    return None


def require_fresh(command: Command, signature: Signature, now: int, max_age: int) -> None:
    if signature.created > now + FUTURE_SKEW:
        raise Refused(f"stale signature: made {signature.created - now}s in the future")
    if signature.created < now - max_age:
        raise Refused(f"stale signature: made {now - signature.created}s ago (limit {max_age}s)")
    if command.timestamp:
        stamp = calendar.timegm(time.strptime(command.timestamp, "%Y%m%d%H%M"))
        if not now - TIMESTAMP_MAX_AGE <= stamp <= now + FUTURE_SKEW:
            raise Refused(
                f"stale timestamp {command.timestamp}: outside [now - 1 hour, now + 5 minutes]"
            )


def accept(
    data: bytes, config: dict[str, Any], now: int
) -> tuple[Command, str, tuple[str, ...] | None]:
    """The command, its signer and distributions, if every check passes; Refused otherwise."""
    try:
        line, message = parse_message(data)
        command = parse_command(line)
    except Unsigned as error:
        raise Refused(f"unsigned command: {error}") from None
    except Malformed as error:
        raise Refused(f"malformed command: {error}") from None
    try:
        signature = verify(message, config["keyring"])
    except SignatureRefused as error:
        raise Refused(str(error)) from None
    distributions = authorise(command, signature.signer, config["signers"])
    max_age = int(config["signature_max_age"])
    require_fresh(command, signature, now, max_age)
    key = command_key(signature.signer, signature.created, command.line)
    try:
        fresh = consume(
            config["used_commands"],
            key,
            signature.created,
            now,
            max_age,
            int(config["max_used_commands"]),
        )
    except StoreError as error:
        raise Refused(str(error)) from None
    if not fresh:
        raise Refused(f"replayed: {command.kind} signed by {signature.signer} already ran")
    return command, signature.signer, distributions


def run(
    command: Command, distributions: tuple[str, ...] | None, config: dict[str, Any], log: ServiceLog
) -> int:
    """Start the command in every builder that takes it; how many did."""
    started = 0
    for builder in read_builders(config["builders_list"]):
        try:
            name, steps = command_steps(
                builder, command, distributions, float(config["query_timeout"])
            )
        except NotForThisBuilder as error:
            log.line(f"{command.kind}: not in this builder: {error}")
            continue
        output = log.action_log(name, builder.release)
        pid = start_detached(builder, steps, output, action_environment(config))
        log.line(f"{command.kind} started in {builder.directory} (process {pid}, log {output})")
        started += 1
    return started


def main() -> int:
    config = load_config()
    log = ServiceLog(config["logs_directory"], "qubesbuilder.ProcessGithubCommand")
    source = caller(config, log)
    if source is None:
        return 1
    data = read_input(sys.stdin.buffer)
    ignore_input()
    try:
        command, signer, distributions = accept(data, config, int(time.time()))
    except Refused as error:
        log.line(f"refused from {source}: {error}")
        return 1
    log.line(f"accepted from {source}: {command.line} (signed by {signer})")
    if not run(command, distributions, config, log):
        log.line(f"{command.kind}: no builder here takes it: nothing run")
    return 0
