# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The signed commands a build qube has already accepted, so that none runs twice.

A command is identified by its signer, its signature's creation time and its command line:
what the signer actually signed. The armour, the unhashed parts of the signature packet and the
signature's own bytes are left out on purpose, since anyone can change those without the key
and still have a good signature. A maintainer who signs the same line again makes a new command
(a new creation time); a copy of one already run is "replayed".

Every command must be younger than the signature age limit (it is refused as stale otherwise),
so an entry older than that limit can never match again and is pruned: the store stays bounded.
It is written atomically under a lock; an unreadable store refuses every command (fail closed).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator

# Entries are kept this much longer than the age limit, in case the clock steps back.
CLOCK_MARGIN = 3600


class StoreError(Exception):
    """The store cannot be read, written, or holds too many live commands."""


def command_key(signer: str, created: int, line: str) -> str:
    return hashlib.sha256(f"{signer}\n{created}\n{line}".encode("ascii")).hexdigest()


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _load(path: str) -> dict[str, int]:
    try:
        with open(path, encoding="ascii") as source:
            entries = json.load(source)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise StoreError(f"the store of used commands {path} is unreadable: {error}") from None
    if not isinstance(entries, dict) or not all(isinstance(v, int) for v in entries.values()):
        raise StoreError(f"the store of used commands {path} is not a mapping of times")
    return entries


def _save(path: str, entries: dict[str, int]) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="ascii") as out:
        json.dump(entries, out, sort_keys=True)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)


def consume(path: str, key: str, created: int, now: int, max_age: int, max_entries: int) -> bool:
    """Record key (signed at `created`) as used; False if it was already. Prunes entries that
    the age limit makes impossible to replay."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        with _locked(path):
            entries = _load(path)
            oldest = now - max_age - CLOCK_MARGIN
            live = {name: when for name, when in entries.items() if when >= oldest}
            if key in live:
                return False
            if len(live) >= max_entries:
                raise StoreError(
                    f"the store of used commands {path} holds {len(live)} live commands"
                )
            live[key] = created
            _save(path, live)
    except OSError as error:
        raise StoreError(f"the store of used commands {path} cannot be written: {error}") from None
    return True
