# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The report of playbooks/verify.yml: every check of the deployed system, decided in dom0."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ansible_collections.qubes_infra.build.plugins.plugin_utils.verify_report import report


def build_infra_verify_report(
    entries: list[Mapping[str, Any]],
    exported_keys: Mapping[str, str] | None = None,
    volumes: list[Mapping[str, Any]] | None = None,
    flows: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The table of checks (qube, check, ok or FAIL, detail or fix) and how many failed.
    exported_keys: keys qube -> the primary fingerprint of the public key exported from it."""
    exported = {str(qube): str(key or "").upper() for qube, key in (exported_keys or {}).items()}
    return report(entries, exported, volumes or [], flows)


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"build_infra_verify_report": build_infra_verify_report}
