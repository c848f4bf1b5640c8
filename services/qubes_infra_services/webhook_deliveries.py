# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The receiver's memory of accepted deliveries, so that each is acted on once.

GitHub signs the body, not the headers: a captured delivery can be sent again under any
`X-GitHub-Delivery` and `X-GitHub-Event`. So a delivery is known by the SHA-256 digest of its
body and by its delivery id; either one already remembered makes a duplicate.

Bounded in time and space, both stated in the settings:
- time: an entry is kept `window + SKEW` seconds after it was accepted, and a body whose signed
  time is older than `window` (or more than SKEW in the future) is refused, so a body that could
  still pass the age check is always remembered;
- space: at most `max_entries` entries (one per accepted delivery, about 200 bytes each on
  disk). Past it the earliest accepted go, and the latest signed time among those forgotten
  (the horizon) is kept: a body signed no later than the horizon is refused as older than the
  memory. A forgotten body with a signed time can thus never be accepted again; one without
  (GitHub's push and issue_comment bodies always have one) can, once forgotten. The horizon only
  moves once `max_entries` deliveries were accepted within the window, and then stays that many
  deliveries behind the newest: a genuine delivery is refused by it only if GitHub delivers it
  after that many later ones.

One SQLite file in the state folder (on the private volume: a restart forgets nothing), shared by
the receiver's processes; the check, the spooling and the remembering happen in one write
transaction, so two processes given the same body at once accept it once.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import TypeVar

# Clock difference tolerated between GitHub and this qube (seconds).
SKEW = 300
Result = TypeVar("Result")


class Duplicate(Exception):
    """The delivery was accepted before."""


class TooOld(Exception):
    """The body's signed time is out of the accepted window or behind the memory's horizon."""


class Deliveries:
    def __init__(self, path: str, window: int, max_entries: int) -> None:
        self.path = path
        self.window = window
        self.max_entries = max_entries
        self._local = threading.local()

    def _connect(self) -> sqlite3.Connection:
        """One connection per process and thread: gunicorn forks its workers after loading the
        application, and a SQLite connection must cross neither a fork nor a thread."""
        if getattr(self._local, "pid", None) != os.getpid():
            self._local.connection, self._local.pid = self._open(), os.getpid()
        connection: sqlite3.Connection = self._local.connection
        return connection

    def _open(self) -> sqlite3.Connection:
        # Switching to WAL takes the database without waiting on the busy timeout: the first
        # processes to open a new file do it one at a time.
        with open(f"{self.path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._open_locked()

    def _open_locked(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        # A remembered delivery is on disk before the reply, as the spooled event is.
        connection.execute("PRAGMA synchronous=FULL")
        connection.executescript(
            "CREATE TABLE IF NOT EXISTS seen (digest TEXT PRIMARY KEY, delivery TEXT,"
            " accepted REAL NOT NULL, signed REAL);"
            "CREATE INDEX IF NOT EXISTS seen_delivery ON seen (delivery);"
            "CREATE INDEX IF NOT EXISTS seen_accepted ON seen (accepted);"
            "CREATE TABLE IF NOT EXISTS horizon (one INTEGER PRIMARY KEY CHECK (one = 1),"
            " signed REAL NOT NULL);"
        )
        return connection

    def check_age(self, signed: float | None, now: float) -> None:
        if signed is None:
            return
        if signed < now - self.window:
            raise TooOld(f"signed {int(now - signed)} s ago, more than {self.window} s")
        if signed > now + SKEW:
            raise TooOld(f"signed {int(signed - now)} s in the future")

    def once(
        self,
        digest: str,
        delivery: str,
        signed: float | None,
        act: Callable[[], tuple[bool, Result]],
    ) -> Result:
        """act() unless the delivery was accepted before (Duplicate) or its signed time is
        behind the memory (TooOld); when act says it accepted the delivery, it is remembered."""
        now = time.time()
        self.check_age(signed, now)
        connection = self._connect()
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.execute("DELETE FROM seen WHERE accepted < ?", (now - self.window - SKEW,))
            if connection.execute(
                "SELECT 1 FROM seen WHERE digest = ? OR (delivery = ? AND delivery != '')",
                (digest, delivery),
            ).fetchone():
                raise Duplicate(digest)
            row = connection.execute("SELECT signed FROM horizon").fetchone()
            if signed is not None and row is not None and signed <= row[0]:
                raise TooOld("signed before the oldest delivery still remembered")
            accepted, result = act()
            if accepted:
                connection.execute(
                    "INSERT INTO seen (digest, delivery, accepted, signed) VALUES (?, ?, ?, ?)",
                    (digest, delivery, now, signed),
                )
                self._forget_past_bound(connection)
            connection.execute("COMMIT")
            return result
        except BaseException:
            connection.execute("ROLLBACK")
            raise

    def _forget_past_bound(self, connection: sqlite3.Connection) -> None:
        (count,) = connection.execute("SELECT COUNT(*) FROM seen").fetchone()
        excess = count - self.max_entries
        if excess <= 0:
            return
        forgotten = "SELECT digest, signed FROM seen ORDER BY accepted LIMIT ?"
        (latest_signed,) = connection.execute(
            f"SELECT MAX(signed) FROM ({forgotten})", (excess,)
        ).fetchone()
        connection.execute(
            f"DELETE FROM seen WHERE digest IN (SELECT digest FROM ({forgotten}))", (excess,)
        )
        if latest_signed is not None:
            connection.execute(
                "INSERT INTO horizon (one, signed) VALUES (1, ?) ON CONFLICT (one) DO UPDATE"
                " SET signed = MAX(signed, excluded.signed)",
                (latest_signed,),
            )
