"""A GitHub webhook request, as GitHub sends it: the event, its delivery id and the body's
HMAC-SHA256 signature in X-Hub-Signature-256."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import os
import time


def signature(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def push_body(full_name: str, ref: str = "refs/heads/main") -> bytes:
    """A push event's body as GitHub's, in what the receiver reads: the full ref, a new commit
    (each body differs, as each push's does) and the time of the push, which GitHub signs."""
    payload = {
        "ref": ref,
        "after": os.urandom(20).hex(),
        "repository": {"full_name": full_name, "pushed_at": int(time.time())},
    }
    return json.dumps(payload).encode()


def post(
    connection: http.client.HTTPConnection,
    route: str,
    body: bytes,
    *,
    secret: bytes,
    event: str = "push",
    delivery: str = "",
    signed: str | None = None,
) -> tuple[int, str]:
    """POST the webhook on connection (closed afterwards), signed with secret unless `signed`
    gives the header; the status and the reply's text. Status 0 when the server closed the
    connection before answering (as nginx may on an oversized body)."""
    headers = {
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery,
        "Content-Type": "application/json",
        "X-Hub-Signature-256": signature(secret, body) if signed is None else signed,
    }
    try:
        connection.request("POST", route, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read().decode("ascii", "replace")
    except (ConnectionError, http.client.HTTPException):
        return 0, ""
    finally:
        connection.close()
