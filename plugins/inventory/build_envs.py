# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
name: build_envs
short_description: The qubes of the Qubes OS build infrastructure, from build_infra_* variables
version_added: 0.1.0
description:
  - Reads the C(build_infra_*) variables from C(group_vars/all) next to the inventory file (a file
    C(all.yml) or a directory C(all/)), validates them, and makes a host for every qube the build
    environments need, that is C(dom0), C(build-ENV), C(keys-ENV), each logs qube, the net qube
    and the templates.
  - Groups C(build_vms), C(keys_vms), C(logs_vms), C(net_vms), C(templates) and C(env_ENV) (the
    qubes of one environment, its logs qube included, and C(dom0), which makes them and their
    policy, so that C(--limit env_ENV) applies the whole environment).
    Every host but dom0 uses the C(qubes_infra.build.qubes) connection, and becomes root with
    the C(qubes_infra.build.qubes) become method (qrexec asks the qube for root; no sudo).
  - Host variables C(build_infra_env) (the environment, where there is one) and C(build_infra_qube)
    (kind, class, label, template, netvm, volume_size) carry what the qube should be.
  - Vault-encrypted files in C(group_vars/all) are not read (they hold secrets, not the layout);
    values are taken as written, without templating.
  - Invalid variables fail the inventory with a message naming the environment, the key and the
    rule.
extends_documentation_fragment:
  - ansible.builtin.constructed
options:
  plugin:
    description: The name of this plugin.
    required: true
    type: str
    choices: [qubes_infra.build.build_envs]
"""

EXAMPLES = r"""
# inventory/build_infra.yml, with the environments in inventory/group_vars/all/build_infra.yml
plugin: qubes_infra.build.build_envs
keyed_groups:
  - key: build_infra_qube.template
    prefix: based_on
"""

import os
import sys

from ansible.errors import AnsibleParserError
from ansible.plugins.inventory import BaseInventoryPlugin, Constructable
from ansible_collections.qubes_infra.build.plugins.module_utils.build_envs import (
    ConfigError,
    Infrastructure,
    load,
)

# Every qube is reached over qrexec, and root in it through qrexec too (become), never with sudo:
# Qubes' minimal templates have no passwordless root.
QUBE_CONNECTION = {
    "ansible_connection": "qubes_infra.build.qubes",
    "ansible_become_method": "qubes_infra.build.qubes",
}
FILE_SUFFIXES = ("build_infra.yml", "build_infra.yaml", "build_envs.yml", "build_envs.yaml")
VAULT_HEADER = b"$ANSIBLE_VAULT"


class InventoryModule(BaseInventoryPlugin, Constructable):
    NAME = "qubes_infra.build.build_envs"

    def verify_file(self, path: str) -> bool:
        return super().verify_file(path) and path.endswith(FILE_SUFFIXES)

    def _group_vars_files(self, directory: str) -> list[str]:
        base = os.path.join(directory, "group_vars")
        files = [os.path.join(base, f"all{suffix}") for suffix in (".yml", ".yaml", ".json", "")]
        folder = os.path.join(base, "all")
        if os.path.isdir(folder):
            files += [
                os.path.join(folder, name)
                for name in sorted(os.listdir(folder))
                if name.endswith((".yml", ".yaml", ".json"))
            ]
        return [path for path in files if os.path.isfile(path)]

    def _read_variables(self, directory: str) -> dict[str, object]:
        variables: dict[str, object] = {}
        for path in self._group_vars_files(directory):
            with open(path, "rb") as source:
                if source.read(len(VAULT_HEADER)) == VAULT_HEADER:
                    continue
            data = self.loader.load_from_file(path, cache="none") or {}
            if not isinstance(data, dict):
                raise AnsibleParserError(f"{path}: group variables must be a mapping")
            variables.update(
                {key: value for key, value in data.items() if str(key).startswith("build_infra_")}
            )
        return variables

    def parse(self, inventory: object, loader: object, path: str, cache: bool = True) -> None:
        super().parse(inventory, loader, path, cache)
        self._read_config_data(path)
        variables = self._read_variables(os.path.dirname(os.path.abspath(path)))
        try:
            infrastructure = load(variables)
        except ConfigError as error:
            raise AnsibleParserError(f"{path}: {error}") from None
        self._populate(infrastructure)

    def _add(self, host: str, groups: list[str], variables: dict[str, object]) -> None:
        self.inventory.add_host(host)
        for group in groups:
            self.inventory.add_group(group)
            self.inventory.add_child(group, host)
        for key, value in variables.items():
            self.inventory.set_variable(host, key, value)

    def _populate(self, infrastructure: Infrastructure) -> None:
        # dom0 is a host; Ansible cannot also make it a group of itself, and `hosts: dom0` works.
        # It is in every env_ENV group: it makes the qubes and the policy of each environment.
        self._add(
            "dom0",
            [f"env_{env.name}" for env in infrastructure.envs],
            {
                "ansible_connection": "local",
                # The controller's own Python (inventory values are not templated).
                "ansible_python_interpreter": sys.executable,
            },
        )
        for name, qube in infrastructure.qubes().items():
            groups = [f"{qube['kind']}_vms"]
            envs = (
                [qube["env"]]
                if qube["env"]
                else [env.name for env in infrastructure.envs if env.logs == name]
            )
            groups += [f"env_{env}" for env in envs]
            variables: dict[str, object] = {**QUBE_CONNECTION, "build_infra_qube": qube}
            if qube["env"]:
                variables["build_infra_env"] = qube["env"]
            self._add(name, groups, variables)
        self._add(infrastructure.netvm, ["net_vms"], dict(QUBE_CONNECTION))
        for template, template_kinds in infrastructure.templates.items():
            self._add(
                template,
                ["templates"],
                {**QUBE_CONNECTION, "build_infra_template_kinds": template_kinds},
            )
        self._construct()

    def _construct(self) -> None:
        strict = self.get_option("strict")
        for host in list(self.inventory.hosts):
            hostvars = self.inventory.get_host(host).get_vars()
            self._set_composite_vars(self.get_option("compose"), hostvars, host, strict=strict)
            self._add_host_to_composed_groups(
                self.get_option("groups"), hostvars, host, strict=strict
            )
            self._add_host_to_keyed_groups(
                self.get_option("keyed_groups"), hostvars, host, strict=strict
            )
