# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The GitHub webhook receiver of the net qube: a WSGI application (standard library only).

Routes as builder-github's: `POST /api/services/trigger_build` (push events: build the pushed
component) and `POST /api/services/process_comment` (issue comments carrying a signed command).
Stricter than upstream: the HMAC-SHA256 signature is mandatory and compared in constant time,
before anything of the body is looked at; the body is bounded; a repository name that is not a
safe component name is refused here already; and nothing calls a build qube from the request:
an accepted event is stored durably in the spool (see webhook_spool) before the reply, and the
worker delivers it. Each request leaves one line in the log with its decision.

A delivery is acted on once (see webhook_deliveries): a body or a delivery id accepted before is
answered 200 `duplicate` (GitHub does not retry a 2xx) and logged, nothing more. Since the
`X-GitHub-Event` header is not signed, the body must have the shape of the route's event (a
push: a `ref` under `refs/` and no `action`; an issue comment: `issue` and `comment` objects),
else 400. Where the event carries a time GitHub signed (a push's `repository.pushed_at`, the
time of the push; a comment's `comment.created_at`), a body signed longer ago than the replay
window is refused with 400; `head_commit.timestamp` is not used, being the commit's own time,
which may be days before a push of it. A body without such a time (GitHub always sends one;
test and hand-made bodies may not) is accepted and remembered like any other. JSON nesting is
bounded (MAX_DEPTH) before the parser, which recurses, sees the body.

Served by gunicorn behind nginx: `gunicorn 'webhook_receiver:create_application()'`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from qubes_infra_services import webhook_settings
from qubes_infra_services.definitions import COMPONENT_RULE, is_component
from qubes_infra_services.webhook_deliveries import Deliveries, Duplicate, TooOld
from qubes_infra_services.webhook_log import DecisionLog
from qubes_infra_services.webhook_spool import Spool, SpoolFull

ROUTES = {
    "/api/services/trigger_build": "push",
    "/api/services/process_comment": "issue_comment",
}
SIGNATURE_PREFIX = "sha256="
SIGNED_START = "-----BEGIN PGP SIGNED MESSAGE-----\nHash: "
SIGNED_END = "\n-----END PGP SIGNATURE-----"
# Deepest JSON nesting read (GitHub's payloads nest about 6 deep); deeper is refused before the
# parser, which recurses and would stop at Python's recursion limit with an error.
MAX_DEPTH = 400
# A JSON string (its escapes included): brackets inside one do not nest.
JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))
OPENING = frozenset(b"[{")
MAX_DELIVERY_ID = 100

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


@dataclass
class Outcome:
    status: int
    decision: str
    reason: str
    component: str = ""


class Refused(Exception):
    def __init__(self, status: int, decision: str, reason: str) -> None:
        super().__init__(reason)
        self.outcome = Outcome(status, decision, reason)


STATUS_TEXT = {
    200: "OK",
    202: "Accepted",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Payload Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def component_of(full_name: object) -> str:
    """The component of `OWNER/qubes-NAME` (NAME) or `OWNER/NAME`, as upstream derives it;
    refused unless it is a safe TriggerBuild argument."""
    if not isinstance(full_name, str) or full_name.count("/") != 1:
        raise Refused(400, "refused", "repository.full_name is not OWNER/NAME")
    name = full_name.split("/")[1]
    component = name.removeprefix("qubes-")
    if not is_component(component):
        raise Refused(400, "refused", f"repository name is not a component name ({COMPONENT_RULE})")
    return component


def nests_deeper_than(body: bytes, limit: int) -> bool:
    """Whether the JSON text nests arrays and objects deeper than limit."""
    brackets = JSON_STRING.sub(b"", body).translate(None, NOT_BRACKETS)
    depth = 0
    for byte in brackets:
        depth += 1 if byte in OPENING else -1
        if depth > limit:
            return True
    return False


def is_push(payload: dict[str, Any]) -> bool:
    """A push event's body: its ref is a full one (a `create` or `delete` event's is short) and
    it has no action (most other events have one)."""
    ref = payload.get("ref")
    return isinstance(ref, str) and ref.startswith("refs/") and "action" not in payload


def is_issue_comment(payload: dict[str, Any]) -> bool:
    """An issue_comment event's body: an issue and a comment (a commit's, a pull request
    review's or a discussion's comment comes without an issue)."""
    return (
        isinstance(payload.get("action"), str)
        and isinstance(payload.get("issue"), dict)
        and isinstance(payload.get("comment"), dict)
    )


SHAPES: dict[str, Callable[[dict[str, Any]], bool]] = {
    "push": is_push,
    "issue_comment": is_issue_comment,
}


def signed_time(event: str, payload: dict[str, Any]) -> float | None:
    """The time GitHub signed in the body (seconds since the epoch), None when it has none."""
    if event == "push":
        repository = payload.get("repository")
        value = repository.get("pushed_at") if isinstance(repository, dict) else None
        where = "repository.pushed_at"
    else:
        value = payload["comment"].get("created_at")
        where = "comment.created_at"
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and len(value) <= 40:
        # GitHub writes UTC as `Z`, which Python before 3.11 does not read.
        text = value[:-1] + "+00:00" if value.endswith("Z") else value
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            pass
        else:
            if moment.tzinfo is not None:
                return moment.timestamp()
    raise Refused(400, "refused", f"{where} is not a time")


def signed_command(body: str) -> str:
    """The inline-signed message of a comment, cut as builder-github does: trailing blanks of
    each line dropped, from the first signed-message header to the end of the first
    signature, with a final newline. Empty when there is none."""
    text = "\n".join(line.rstrip(" \t\r") for line in body.split("\n"))
    start = text.find(SIGNED_START)
    if start < 0:
        return ""
    end = text.find(SIGNED_END, start)
    if end < 0:
        return ""
    return text[start : end + len(SIGNED_END)] + "\n"


class Receiver:
    def __init__(self, settings: webhook_settings.Settings, secret: bytes) -> None:
        if not secret:
            raise ValueError("the webhook secret is empty")
        self.settings = settings
        self.secret = secret
        self.spool = Spool(
            settings.spool_directory, settings.spool_max_events, settings.spool_max_bytes
        )
        self.log = DecisionLog(settings.log_file, settings.log_max_bytes)
        self.deliveries = Deliveries(
            settings.deliveries_file, settings.replay_window, settings.deliveries_max
        )

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        event = environ.get("HTTP_X_GITHUB_EVENT", "")
        try:
            outcome = self.handle(environ, event)
        except Refused as refused:
            outcome = refused.outcome
        self.log.write(
            source=environ.get("HTTP_X_REAL_IP") or environ.get("REMOTE_ADDR", ""),
            delivery=environ.get("HTTP_X_GITHUB_DELIVERY", ""),
            route=environ.get("PATH_INFO", ""),
            event=event,
            component=outcome.component,
            status=str(outcome.status),
            decision=outcome.decision,
            reason=outcome.reason,
        )
        reply = f"{outcome.decision}: {outcome.reason}\n".encode("ascii", "replace")
        start_response(
            f"{outcome.status} {STATUS_TEXT[outcome.status]}",
            [("Content-Type", "text/plain; charset=us-ascii"), ("Content-Length", str(len(reply)))],
        )
        return [reply]

    def handle(self, environ: dict[str, Any], event: str) -> Outcome:
        wanted = ROUTES.get(environ.get("PATH_INFO", ""))
        if wanted is None:
            raise Refused(404, "refused", "unknown service")
        if environ.get("REQUEST_METHOD") != "POST":
            raise Refused(405, "refused", "only POST is served")
        body = self.read_body(environ)
        self.verify_signature(environ.get("HTTP_X_HUB_SIGNATURE_256", ""), body)
        if event != wanted:
            return Outcome(200, "ignored", f"event {event[:40]!r} is not handled here")
        payload = self.parse(body)
        if not SHAPES[wanted](payload):
            raise Refused(400, "refused", f"the body is not that of a {wanted} event")
        signed = signed_time(wanted, payload)
        act = self.trigger if wanted == "push" else self.comment
        delivery = environ.get("HTTP_X_GITHUB_DELIVERY", "")

        def once() -> tuple[bool, Outcome]:
            outcome = act(payload, delivery)
            return outcome.decision in ("accepted", "coalesced"), outcome

        digest = hashlib.sha256(body).hexdigest()
        try:
            # GitHub's delivery ids are 36 characters; a longer header is remembered cut.
            return self.deliveries.once(digest, delivery[:MAX_DELIVERY_ID], signed, once)
        except Duplicate:
            return Outcome(200, "duplicate", "this delivery or body was accepted before")
        except TooOld as old:
            raise Refused(400, "refused", f"too old: {old}") from None
        except sqlite3.Error as error:
            # Nothing is acted on without the memory; GitHub may send the delivery again.
            return Outcome(503, "refused", f"the memory of deliveries failed: {error}")

    @staticmethod
    def parse(body: bytes) -> dict[str, Any]:
        if nests_deeper_than(body, MAX_DEPTH):
            raise Refused(400, "refused", f"the body's JSON nests deeper than {MAX_DEPTH}")
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, ValueError):
            raise Refused(400, "refused", "the body is not JSON") from None
        if not isinstance(payload, dict):
            raise Refused(400, "refused", "the body is not a JSON object")
        return payload

    def read_body(self, environ: dict[str, Any]) -> bytes:
        length_text = environ.get("CONTENT_LENGTH") or ""
        if not length_text:
            raise Refused(411, "refused", "no Content-Length")
        if not length_text.isdigit():
            raise Refused(400, "refused", "invalid Content-Length")
        length = int(length_text)
        if length > self.settings.max_body:
            raise Refused(413, "refused", f"body larger than {self.settings.max_body} bytes")
        stream = environ["wsgi.input"]
        chunks, remaining = [], length
        while remaining:
            chunk = stream.read(min(remaining, 1 << 16))
            if not chunk:
                raise Refused(400, "refused", "body shorter than its Content-Length")
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def verify_signature(self, header: str, body: bytes) -> None:
        if not header:
            raise Refused(403, "refused", "no X-Hub-Signature-256")
        expected = SIGNATURE_PREFIX + hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        # WSGI headers are latin-1 strings; bytes keep compare_digest to any content.
        if not hmac.compare_digest(expected.encode("ascii"), header.encode("latin-1")):
            raise Refused(403, "refused", "bad X-Hub-Signature-256")

    def trigger(self, payload: dict[str, Any], delivery: str) -> Outcome:
        repository = payload.get("repository")
        full_name = repository.get("full_name") if isinstance(repository, dict) else None
        component = component_of(full_name)
        try:
            queued = self.spool.add_trigger(component, delivery)
        except SpoolFull as full:
            return Outcome(503, "refused", f"spool full ({full})", component)
        if not queued:
            return Outcome(200, "coalesced", "a trigger of this component is pending", component)
        return Outcome(202, "accepted", "build trigger spooled", component)

    def comment(self, payload: dict[str, Any], delivery: str) -> Outcome:
        if payload.get("action") != "created":
            return Outcome(200, "ignored", "comment not newly created")
        comment = payload.get("comment")
        body = comment.get("body") if isinstance(comment, dict) else None
        if not isinstance(body, str):
            raise Refused(400, "refused", "comment.body is not a string")
        if not body.isascii():
            return Outcome(200, "ignored", "comment is not ASCII")
        command = signed_command(body)
        if not command:
            return Outcome(200, "ignored", "no signed command in the comment")
        if len(command) > self.settings.max_command_bytes:
            limit = self.settings.max_command_bytes
            return Outcome(200, "ignored", f"signed command longer than {limit} bytes")
        try:
            self.spool.add_command(command, delivery)
        except SpoolFull as full:
            return Outcome(503, "refused", f"spool full ({full})")
        return Outcome(202, "accepted", "signed command spooled")


def create_application(settings_path: str | None = None) -> Receiver:
    settings = webhook_settings.load(settings_path)
    with open(settings.secret_file, "rb") as stored:
        secret = stored.read().strip()
    return Receiver(settings, secret)
