# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The infrastructure's description: the build_infra_* variables of group_vars/all next to the
inventory, read as Ansible reads group_vars.

Shared by the build_envs inventory plugin (which makes the hosts from it) and the preflight's
build_infra_source action (which checks that the run resolves nothing else). Controller only.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any

from ansible.errors import AnsibleError, AnsibleParserError
from ansible.template import Templar
from ansible.utils.vars import combine_vars

PREFIX = "build_infra_"


def group_vars_all(directory: str) -> str:
    """Where the description lives for an inventory in `directory`."""
    return os.path.join(directory, "group_vars", "all")


def plain(value: Any) -> Any:
    """A loaded or templated value as plain data: Vault-encrypted strings decrypted (str() does
    it, with the loader's secrets), Ansible's string and container types made the built-in ones,
    so that values from different loaders compare equal."""
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, str) or type(value).__name__ in (
        "EncryptedString",
        "AnsibleVaultEncryptedUnicode",
    ):
        return str(value)
    return value


def load_file(loader: Any, path: str) -> Any:
    """A variables file loaded as Ansible loads group_vars: ansible-core 2.19 trusts the templates
    of such files only when asked (older versions template every string)."""
    if "trusted_as_template" in inspect.signature(loader.load_from_file).parameters:
        return loader.load_from_file(path, trusted_as_template=True)
    return loader.load_from_file(path)


def read_files(loader: Any, directory: str) -> dict[str, Any]:
    """Every variable of group_vars/all next to the inventory in `directory`, found and loaded by
    Ansible's DataLoader as the host_group_vars plugin does (all, all.yml, all.yaml, all.json or
    the folder all/; Vault-encrypted files decrypted), combined in Ansible's order."""
    base = os.path.join(directory, "group_vars")
    files = loader.find_vars_files(base, "all") if os.path.isdir(base) else []
    variables: dict[str, Any] = {}
    for path in files:
        data = load_file(loader, path)
        if data is None:
            continue
        if not isinstance(data, Mapping):
            raise AnsibleParserError(f"{path}: group variables must be a mapping")
        variables = combine_vars(variables, data)
    return variables


def read_description(loader: Any, directory: str) -> dict[str, Any]:
    """The build_infra_* variables of group_vars/all next to the inventory in `directory`,
    templated with the variables of those files (and lookups), as plain data."""
    variables = read_files(loader, directory)
    templar = Templar(loader=loader, variables=variables)
    description = {}
    for key, value in variables.items():
        if not str(key).startswith(PREFIX):
            continue
        try:
            description[str(key)] = plain(templar.template(value))
        except AnsibleError as error:
            raise AnsibleParserError(
                f"{key} (in {group_vars_all(directory)}): cannot be rendered: {error}. A template"
                " there may use lookups and the variables of group_vars/all only; no host's."
            ) from None
    return description
