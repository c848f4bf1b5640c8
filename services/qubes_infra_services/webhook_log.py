# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The webhook log: one line per request (and per delivery), bounded in size.

Fields come from the network: each value is cut to a fixed length and anything outside a small
safe set of characters is shown as `?`, so a line can be neither forged nor made long. When the
log would pass its maximum size it becomes `LOG.1` (replacing the previous one) and a new log
starts; the processes of the receiver and the worker take turns under a lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time

from qubes_infra_services.definitions import printable

UNSAFE = re.compile(r"[^A-Za-z0-9_.,:/+=@-]")
MAX_VALUE = 64
MAX_REASON = 200


def value(text: object, limit: int = MAX_VALUE) -> str:
    shown = UNSAFE.sub("?", str(text)[: limit + 1])
    return shown[:limit] + "..." if len(shown) > limit else shown or "-"


def reason(text: str) -> str:
    """Free text in double quotes: printable ASCII, no quotes, bounded."""
    cleaned = printable(text, MAX_REASON).replace('"', "?").replace("\\", "?")
    return f'"{cleaned}"'


class DecisionLog:
    def __init__(self, path: str, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes

    def write(self, **fields: str) -> None:
        """One line `TIME key=value ... reason="..."`; reason, when given, comes last."""
        why = fields.pop("reason", None)
        parts = [time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())]
        parts += [f"{key}={value(text)}" for key, text in fields.items()]
        if why is not None:
            parts.append(f"reason={reason(why)}")
        self._append((" ".join(parts) + "\n").encode("ascii"))

    def _append(self, line: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_size + len(line) > self.max_bytes:
                # Only if nobody rotated it while this process waited for the lock.
                with contextlib.suppress(FileNotFoundError):
                    if os.path.samestat(os.stat(self.path), os.fstat(fd)):
                        os.replace(self.path, self.path + ".1")
                os.close(fd)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, line)
        finally:
            os.close(fd)
