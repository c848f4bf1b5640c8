"""Volume sizes as qvm-volume reads them: bytes, or a number with a decimal or binary unit."""

from __future__ import annotations

import re

from qubesim.errors import UsageError

_UNITS = {
    "": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
_SIZE = re.compile(r"(\d+)\s*([a-zA-Z]*)")


def parse_size(text: str) -> int:
    match = _SIZE.fullmatch(text.strip())
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise UsageError(
            f"invalid size: {text!r} (bytes, or a number with a unit such as 20GiB, 512MiB, 10G)"
        )
    return int(match.group(1)) * _UNITS[unit]
