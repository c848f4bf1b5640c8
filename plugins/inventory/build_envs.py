# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
name: build_envs
short_description: The qubes of the Qubes OS build infrastructure, from build_infra_* variables
version_added: 0.1.0
description:
  - The single reader of the infrastructure's description, the C(build_infra_*) variables of
    C(group_vars/all) next to the inventory file (a file C(all.yml), C(all.yaml), C(all.json) or
    a directory C(all/)). It finds and loads those files with Ansible's own DataLoader, as Ansible
    reads group_vars, so Vault-encrypted files and C(!vault) values are decrypted (give the vault
    password as for any run), and templates in the values are rendered with lookups and the
    variables of those files (not with any host's variables).
  - It validates the description and makes a host for every qube the build environments need,
    that is C(dom0), C(build-ENV), C(keys-ENV), each logs qube, the net qube and the templates.
  - Groups C(build_vms), C(keys_vms), C(logs_vms), C(net_vms), C(templates) and C(env_ENV) (the
    qubes of one environment, its logs qube included, and C(dom0), which makes them and their
    policy, so that C(--limit env_ENV) applies the whole environment).
    Every host but dom0 uses the C(qubes_infra.build.qubes) connection, and becomes root with
    the C(qubes_infra.build.qubes) become method (qrexec asks the qube for root; no sudo).
  - Every host it makes gets the host variable C(build_infra), the normalised model of the
    infrastructure as plain data, the same on every host. Its keys are C(settings) (every
    C(build_infra_*) setting with its default applied), C(netvm), C(build_template),
    C(keys_template), C(logs_template), C(net_template), C(build_netvm), C(logs_netvm),
    C(remote_hosts) (with ports), C(ssh_hosts), C(envs) (each environment with its defaults and
    its qubes' names), C(qubes) (each qube with its intended properties) and C(templates) (each
    template with the kinds of qube it serves).
  - Host variables C(build_infra_env) (the environment, where there is one),
    C(build_infra_qube) (kind, class, label, template, netvm, volume_size) and, on templates,
    C(build_infra_template_kinds) carry what the host is.
  - One description per run. A C(build_infra_*) variable (or C(build_infra)) that Ansible
    resolves for one of these hosts with another value than the one this plugin gives it (from
    extra vars, a host_vars or other group_vars file, a vars file or play vars) would make a run
    that creates the qubes of one description and configures those of another. The collection's
    playbooks refuse such a run in their preflight, before anything changes, naming the variable,
    the host and the source; the description is changed in the files this plugin reads, only.
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
from ansible_collections.qubes_infra.build.plugins.plugin_utils.build_envs import (
    ConfigError,
    Infrastructure,
    host_variables,
    load,
)
from ansible_collections.qubes_infra.build.plugins.plugin_utils.build_infra_files import (
    read_description,
)

# Every qube is reached over qrexec, and root in it through qrexec too (become), never with sudo:
# Qubes' minimal templates have no passwordless root.
QUBE_CONNECTION = {
    "ansible_connection": "qubes_infra.build.qubes",
    "ansible_become_method": "qubes_infra.build.qubes",
}
FILE_SUFFIXES = ("build_infra.yml", "build_infra.yaml", "build_envs.yml", "build_envs.yaml")


class InventoryModule(BaseInventoryPlugin, Constructable):
    NAME = "qubes_infra.build.build_envs"

    def verify_file(self, path: str) -> bool:
        return super().verify_file(path) and path.endswith(FILE_SUFFIXES)

    def parse(self, inventory: object, loader: object, path: str, cache: bool = True) -> None:
        super().parse(inventory, loader, path, cache)
        self._read_config_data(path)
        directory = os.path.dirname(os.path.abspath(path))
        variables = read_description(self.loader, directory)
        try:
            infrastructure = load(variables)
        except ConfigError as error:
            raise AnsibleParserError(f"{path}: {error}") from None
        self._populate(infrastructure, variables)

    def _add(self, host: str, groups: list[str], variables: dict[str, object]) -> None:
        self.inventory.add_host(host)
        for group in groups:
            self.inventory.add_group(group)
            self.inventory.add_child(group, host)
        for key, value in variables.items():
            self.inventory.set_variable(host, key, value)

    def _populate(self, infrastructure: Infrastructure, variables: dict[str, object]) -> None:
        # dom0 is a host; Ansible cannot also make it a group of itself, and `hosts: dom0` works.
        # It is in every env_ENV group: it makes the qubes and the policy of each environment.
        published = host_variables(infrastructure, variables)
        self._add(
            "dom0",
            [f"env_{env.name}" for env in infrastructure.envs],
            {
                "ansible_connection": "local",
                # The controller's own Python (inventory values are not templated).
                "ansible_python_interpreter": sys.executable,
                **published["dom0"],
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
            self._add(name, groups, {**QUBE_CONNECTION, **published[name]})
        self._add(
            infrastructure.netvm,
            ["net_vms"],
            {**QUBE_CONNECTION, **published[infrastructure.netvm]},
        )
        for template in infrastructure.templates:
            self._add(template, ["templates"], {**QUBE_CONNECTION, **published[template]})
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
