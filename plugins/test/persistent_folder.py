# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Whether a folder of a qube persists in an AppVM: the one rule the roles check their folders
against before they install anything there."""

from __future__ import annotations

import re
from typing import Any

# An AppVM's root volume comes from its template and is discarded at shutdown; what persists is
# the private volume, mounted on /rw, with /home and /usr/local bound from it. A folder of a role
# lies strictly below one of them, named by plain segments (a leading dot allowed, as in
# ~/.config, but never as '.' or '..'): no empty segment, no trailing slash. Plain segments also
# keep each folder one word in the unit files, the service scripts and nginx's configuration.
PERSISTENT_FOLDER = re.compile(r"/(usr/local|home|rw)(/\.?[A-Za-z0-9_][A-Za-z0-9_.-]*)+\Z")


def persistent_folder(path: object) -> bool:
    """True for an absolute path strictly below /usr/local, /home or /rw, of plain segments."""
    return isinstance(path, str) and PERSISTENT_FOLDER.match(path) is not None


class TestModule:
    def tests(self) -> dict[str, Any]:
        return {"persistent_folder": persistent_folder}
