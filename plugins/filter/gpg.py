# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Reading OpenPGP keys in templates: the primary fingerprints of an armoured key or of a gpg
listing, with the same reading as the gpg_key module."""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleFilterError
from ansible_collections.qubes_infra.build.plugins.module_utils.openpgp import (
    ArmorError,
    armored_primaries,
    listed_primaries,
)

ARMOR_START = "-----BEGIN PGP"


def gpg_fingerprints(text: object) -> list[str]:
    """The primary fingerprints, upper case and in order, of the public key blocks of an
    ASCII-armoured text, or of a `gpg --with-colons` listing (a text without armour)."""
    if not isinstance(text, str):
        raise AnsibleFilterError(
            f"gpg_fingerprints: takes text (armoured keys or a gpg --with-colons listing),"
            f" not {type(text).__name__}"
        )
    if ARMOR_START not in text:
        return listed_primaries(text)
    try:
        return armored_primaries(text)
    except ArmorError as error:
        raise AnsibleFilterError(f"gpg_fingerprints: {error}") from None


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"gpg_fingerprints": gpg_fingerprints}
