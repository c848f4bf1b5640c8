# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Sizes written as people write them (20GiB, 512MiB, 10G, a number of bytes).

The qube module reads its volume_size option with it on the target, and the build environments'
model (plugins/plugin_utils/build_envs.py) the volume_size of an environment, so that both take
the same sizes. Standard library only.
"""

from __future__ import annotations

import re

_SIZE = re.compile(r"([0-9]+)\s*([KMGT]i?B?|B?)\Z", re.IGNORECASE)
_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "KI": 1024,
    "MI": 1024**2,
    "GI": 1024**3,
    "TI": 1024**4,
}


class SizeError(ValueError):
    """A size that is not a positive number with an optional unit; the message names where."""


def parse_size(value: object, where: str) -> int:
    """The number of bytes of `value` (a string with an optional unit, or an integer)."""
    text = (
        str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    )
    match = _SIZE.match(text)
    if not match or int(match.group(1)) == 0:
        raise SizeError(
            f"{where}: size {value!r} must be a positive number with an optional unit "
            "(for example 20GiB, 512MiB, 10G)"
        )
    unit = match.group(2).upper().rstrip("B")
    return int(match.group(1)) * _UNITS[unit]
