# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Refuse a run in which a host resolves a build_infra_* variable (or the build_infra model) to
another value than the one the build_envs inventory plugin gives it from the inventory's files.

The plugin makes the hosts and groups of the run from group_vars/all next to the inventory; the
roles read the variables as Ansible resolves them, where extra vars, host_vars, other group_vars,
vars files and play vars win. Were they to differ, dom0 would make the qubes and policy of one
description while the qubes' roles configured those of another. The expected values are made
again here from the same files with the same code as the plugin's, so nothing any other source
sets can stand in for them.
"""

from __future__ import annotations

import os
from typing import Any

from ansible import context
from ansible.errors import AnsibleError
from ansible.parsing.splitter import parse_kv
from ansible.plugins.action import ActionBase
from ansible.utils.vars import load_extra_vars
from ansible_collections.qubes_infra.build.plugins.plugin_utils.build_envs import (
    MODEL,
    ConfigError,
    host_variables,
    load,
    settings,
)
from ansible_collections.qubes_infra.build.plugins.plugin_utils.build_infra_files import (
    PREFIX,
    group_vars_all,
    load_file,
    plain,
    read_description,
)

MISSING = object()  # not given to this host by the inventory
UNRESOLVED = object()  # a value Ansible cannot template: never the inventory's
ELSEWHERE = "not from the inventory's files (extra vars, host_vars, a vars file or play vars)"


def _ours(name: str) -> bool:
    return name == MODEL or name.startswith(PREFIX)


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(
        self, tmp: str | None = None, task_vars: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        result = super().run(tmp, task_vars)
        self.validate_argument_spec(argument_spec={})
        task_vars = task_vars or {}
        host = str(task_vars["inventory_hostname"])
        directory = str(task_vars.get("inventory_dir") or "")
        if not directory:
            return {**result, "changed": False, "msg": f"{host} comes from no inventory file"}
        try:
            description = read_description(self._loader, directory)
            published = host_variables(load(description), description).get(host)
        except (AnsibleError, ConfigError) as error:
            return {**result, "failed": True, "msg": f"{group_vars_all(directory)}: {error}"}
        if published is None:
            # Not a host of the build_envs plugin (another inventory source's): nothing to compare.
            return {
                **result,
                "changed": False,
                "msg": f"{host} is not a host of the build_envs plugin",
            }
        expected = {**settings(description), **published}
        differing = [
            name
            for name in sorted(filter(_ours, task_vars))
            if self._resolved(task_vars[name]) != expected.get(name, MISSING)
        ]
        if differing:
            return {**result, **self._refusal(differing, expected, directory, task_vars)}
        return {**result, "changed": False, "msg": "every build_infra variable is the inventory's"}

    def _refusal(
        self,
        differing: list[str],
        expected: dict[str, Any],
        directory: str,
        task_vars: dict[str, Any],
    ) -> dict[str, Any]:
        host = str(task_vars["inventory_hostname"])
        files = group_vars_all(directory)
        problems = [
            f"{name} for {host} comes from {self._source(name, host, task_vars)}"
            + (
                ", with another value than the inventory's"
                if name in expected
                else f", and the inventory gives {host} no {name}"
            )
            for name in differing
        ]
        return {
            "failed": True,
            "differing": differing,
            "msg": (
                "Refused before anything changes: "
                + "; ".join(problems)
                + f". Put the build_infra_* settings only in {files}, the files the build_envs"
                " inventory plugin reads, and nowhere else: the plugin made the hosts and groups"
                " of this run from them, and the roles would read the other value (part of the"
                " run would apply another infrastructure). The plugin's host variables"
                " (build_infra, build_infra_env, build_infra_qube, build_infra_template_kinds)"
                " are set by no one else."
            ),
        }

    def _resolved(self, value: Any) -> Any:
        try:
            return plain(self._templar.template(value))
        except AnsibleError:
            return UNRESOLVED

    def _source(self, name: str, host: str, task_vars: dict[str, Any]) -> str:
        """The source whose value Ansible uses, looked for in the order of Ansible's precedence,
        as precisely as the source can be told; otherwise a description of where it may be."""
        for find in (self._extra_vars, self._play_vars):
            found = find(name)
            if found:
                return found
        return self._vars_file(name, host, task_vars) or ELSEWHERE

    def _extra_vars(self, name: str) -> str | None:
        if name not in load_extra_vars(self._loader):
            return None
        # The last -e that sets it wins, each read as load_extra_vars reads it.
        for argument in reversed(context.CLIARGS.get("extra_vars", ())):
            text = str(argument).strip()
            if text.startswith("@"):
                # Relative to the directory ansible-playbook was started in, as on the command line.
                data = self._load(os.path.abspath(os.path.expanduser(text[1:])))
            else:
                data = self._parse(text)
            if name in data:
                return f"extra vars (-e {text})" if text.startswith("@") else "extra vars (-e)"
        return "extra vars (-e)"

    def _parse(self, text: str) -> dict[str, Any]:
        try:
            data = self._loader.load(text) if text[:1] in "{[" else parse_kv(text)
        except AnsibleError:
            return {}
        return data if isinstance(data, dict) else {}

    def _play_vars(self, name: str) -> str | None:
        play = self._task.get_play()
        for entry in reversed(play.get_vars_files() or []):
            for candidate in entry if isinstance(entry, list) else [entry]:
                try:
                    path = self._loader.path_dwim(str(self._templar.template(candidate)))
                except AnsibleError:
                    continue
                if name in self._load(path):
                    return f"the play's vars file {path} (vars_files)"
        if name in (play.vars or {}):
            return (
                f"play vars (vars: of the play {play.get_name()!r}, or of the import_playbook"
                " that brought it)"
            )
        return None

    def _vars_file(self, name: str, host: str, task_vars: dict[str, Any]) -> str | None:
        """host_vars of the host, then group_vars of its groups (the most specific first), next
        to the playbook, then next to the inventory; the inventory's group_vars/all is the
        plugin's own."""
        inventory = str(task_vars.get("inventory_dir") or "")
        bases = [self._loader.get_basedir(), inventory]
        groups = [*reversed(task_vars.get("group_names", [])), "all"]
        places = [(base, "host_vars", host) for base in bases]
        places += [(base, "group_vars", group) for base in bases for group in groups]
        for base, kind, entity in places:
            if (
                kind == "group_vars"
                and entity == "all"
                and os.path.abspath(base) == os.path.abspath(inventory)
            ):
                continue
            directory = os.path.join(base, kind)
            if not os.path.isdir(directory):
                continue
            for path in reversed(self._loader.find_vars_files(directory, entity)):
                if name in self._load(path):
                    return f"the {kind} file {path}"
        return None

    def _load(self, path: str) -> dict[str, Any]:
        try:
            data = load_file(self._loader, path)
        except AnsibleError:
            return {}
        return data if isinstance(data, dict) else {}
