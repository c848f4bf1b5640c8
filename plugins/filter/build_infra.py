# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filters that turn the build_infra_* variables into what the roles manage."""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleFilterError
from ansible.module_utils.common.validation import check_type_list
from ansible_collections.qubes_infra.build.plugins.plugin_utils.build_envs import (
    ConfigError,
    Infrastructure,
    load,
)
from ansible_collections.qubes_infra.build.plugins.plugin_utils.build_infra_files import plain
from ansible_collections.qubes_infra.build.plugins.plugin_utils.dom0_policy import (
    PolicyFileError,
    flow_matrix,
    limited_policy_rules,
    policy_rules,
    validate_admin_qubes,
)


def _infrastructure(variables: dict[str, Any]) -> Infrastructure:
    try:
        # plain(): Vault-encrypted values decrypted (ansible-core 2.16 hands them over as objects).
        return load(
            {
                key: plain(value)
                for key, value in variables.items()
                if key.startswith("build_infra_")
            }
        )
    except ConfigError as error:
        raise AnsibleFilterError(str(error)) from None


def _admin_qubes(infrastructure: Infrastructure, admin_qubes: object) -> tuple[str, ...]:
    """dom0_admin_qubes as the dom0 role's argument spec takes it (a list, or a string of
    comma-separated names), then validated."""
    try:
        admins = [] if admin_qubes is None else check_type_list(admin_qubes)
    except TypeError:
        raise AnsibleFilterError(
            f"dom0_admin_qubes: must be a list of qube names, not {admin_qubes!r}"
        ) from None
    try:
        return validate_admin_qubes(infrastructure, admins)
    except ConfigError as error:
        raise AnsibleFilterError(str(error)) from None


def build_infra_qubes(
    variables: dict[str, Any], envs: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """The qubes of the environments named (default: every one) with their intended properties."""
    return _infrastructure(variables).qubes(None if envs is None else set(envs))


def build_infra_envs_of(variables: dict[str, Any], qubes: list[str]) -> list[str]:
    """The environments whose build or keys qube is among `qubes` (the hosts of a --limit)."""
    return _infrastructure(variables).envs_of(qubes)


def build_infra_policy(
    variables: dict[str, Any],
    admin_qubes: list[str] | None = None,
    envs: list[str] | None = None,
    installed: str = "",
) -> list[str]:
    """The dom0 policy lines: every flow of the infrastructure, and the denials of the rest.

    With `envs`, only these environments' sections come from the variables; the others, and the
    shared rules, are taken from the `installed` policy file as they are.
    """
    infrastructure = _infrastructure(variables)
    admins = _admin_qubes(infrastructure, admin_qubes)
    if not envs:
        return policy_rules(infrastructure, admins)
    try:
        return limited_policy_rules(infrastructure, set(envs), installed, admins)
    except PolicyFileError as error:
        raise AnsibleFilterError(str(error)) from None


def build_infra_admin_qubes(variables: dict[str, Any], admin_qubes: list[str]) -> list[str]:
    """The admin qubes of dom0_admin_qubes, validated against the infrastructure (each once)."""
    infrastructure = _infrastructure(variables)
    return list(_admin_qubes(infrastructure, admin_qubes))


def build_infra_env(variables: dict[str, Any], name: str) -> dict[str, Any]:
    """One environment with its defaults applied: its qubes' names, its key, its builders."""
    for env in _infrastructure(variables).envs:
        if env.name == name:
            return env.describe()
    raise AnsibleFilterError(f"build_infra_envs has no environment {name!r}")


def build_infra_ssh_hosts(variables: dict[str, Any]) -> dict[str, int]:
    """The hosts build qubes may reach over ssh through the net qube, and their ports."""
    return _infrastructure(variables).ssh_hosts


def build_infra_flows(variables: dict[str, Any]) -> list[dict[str, str]]:
    """Every call among the infrastructure's qubes, with the qube it must reach (empty: refused)."""
    return flow_matrix(_infrastructure(variables))


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "build_infra_qubes": build_infra_qubes,
            "build_infra_envs_of": build_infra_envs_of,
            "build_infra_policy": build_infra_policy,
            "build_infra_admin_qubes": build_infra_admin_qubes,
            "build_infra_env": build_infra_env,
            "build_infra_flows": build_infra_flows,
            "build_infra_ssh_hosts": build_infra_ssh_hosts,
        }
