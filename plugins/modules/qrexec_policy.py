#!/usr/bin/python
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: qrexec_policy
short_description: A dom0 qrexec policy file, validated with the whole policy, written atomically
version_added: 0.1.0
description:
  - Writes a qrexec policy file in the v5 format from a list of rules.
  - Before anything is replaced, the file is checked together with every other policy file (the
    collection's policy engine, and C(qubes-policy-lint) where it exists). A file that would
    break the policy is not installed; the old file stays as it was.
  - The file is written to a temporary name in the same directory and renamed into place, so
    qrexec never reads half a file.
author:
  - qubes_infra.build maintainers (!UNKNOWN)
options:
  name:
    description:
      - The file name, like V(20-qubes-infra-build.policy). Files are read in name order and the
        first matching rule wins, so use a number below 90 to come before Qubes' defaults.
    type: str
    required: true
  directory:
    description: Where the file goes.
    type: path
    default: /etc/qubes/policy.d
  state:
    description: V(absent) removes the file (if the rest of the policy stays valid).
    type: str
    choices: [present, absent]
    default: present
  rules:
    description:
      - The rules, in order. Each is a line of the v5 format, or a mapping with
        C(service), C(argument) (default V(*)), C(source), C(target), C(action) and C(params)
        (a mapping of the action's parameters, such as C(target) or C(user)).
    type: list
    elements: raw
    default: []
  header:
    description: A comment at the top of the file.
    type: str
    default: Managed by Ansible (qubes_infra.build). Changes made here are overwritten.
attributes:
  check_mode:
    description: Validates and reports, writes nothing.
    support: full
  diff_mode:
    description: Shows the file before and after.
    support: full
"""

EXAMPLES = r"""
- name: Logs reach the logs qube and signing is gated on them
  qubes_infra.build.qrexec_policy:
    name: 20-qubes-infra-build.policy
    rules:
      - qubesbuilder.BuildLog * build-fedora dom0 allow target=build-logs
      - service: qubesbuilder.LogReceived
        argument: +build-fedora
        source: build-logs
        target: dom0
        action: allow
        params: {target: keys-fedora}
"""

RETURN = r"""
path:
  description: The policy file.
  returned: always
  type: str
  sample: /etc/qubes/policy.d/20-qubes-infra-build.policy
"""

import contextlib
import os
import re
import tempfile

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.qubes_infra.build.plugins.module_utils.qrexec_policy import (
    POLICY_DIRECTORIES,
    Policy,
    PolicySyntaxError,
)

_FILE_NAME = re.compile(r"[0-9a-z_.-]+\.policy\Z")
_RULE_KEYS = {"service", "argument", "source", "target", "action", "params"}
DEFAULT_HEADER = "Managed by Ansible (qubes_infra.build). Changes made here are overwritten."


def render_rule(rule: object, index: int) -> str:
    """One rule as a v5 line; a ValueError names the rule and what is wrong."""
    if isinstance(rule, str):
        line = " ".join(rule.split())
        if "\n" in rule.strip() or not line:
            raise ValueError(f"rules[{index}]: a rule is one non-empty line")
        return line
    if not isinstance(rule, dict):
        raise ValueError(f"rules[{index}]: a rule is a line or a mapping")
    unknown = sorted(set(rule) - _RULE_KEYS)
    if unknown:
        raise ValueError(f"rules[{index}]: unknown key {unknown[0]!r}")
    missing = [key for key in ("service", "source", "target", "action") if not rule.get(key)]
    if missing:
        raise ValueError(f"rules[{index}]: {missing[0]!r} is required")
    params = rule.get("params") or {}
    if not isinstance(params, dict):
        raise ValueError(f"rules[{index}].params: must be a mapping")
    words = [
        str(rule["service"]),
        str(rule.get("argument") or "*"),
        str(rule["source"]),
        str(rule["target"]),
        str(rule["action"]),
    ]
    words += [f"{key}={value}" for key, value in params.items()]
    if any(not word or any(c.isspace() for c in word) for word in words):
        raise ValueError(f"rules[{index}]: fields must not be empty or contain spaces")
    return " ".join(words)


def render(header: str, rules: list[object]) -> str:
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    lines += [render_rule(rule, index) for index, rule in enumerate(rules)]
    return "\n".join(lines) + "\n"


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as existing:
            return existing.read()
    except FileNotFoundError:
        return None


def _lint(module: AnsibleModule, directory: str, name: str, content: str) -> None:
    """qubes-policy-lint, where dom0 has it, on the new text (a hidden file qrexec ignores)."""
    lint = module.get_bin_path("qubes-policy-lint")
    if lint is None:
        return
    with tempfile.TemporaryDirectory(prefix=".ansible-policy-", dir=directory) as scratch:
        candidate = os.path.join(scratch, name)
        with open(candidate, "w", encoding="utf-8") as out:
            out.write(content)
        rc, out, err = module.run_command([lint, candidate])
        if rc != 0:
            module.fail_json(
                msg=f"qubes-policy-lint refused the new {name}: {(err or out).strip()}"
            )


def _install(directory: str, name: str, content: str) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o644)
        os.rename(temporary, os.path.join(directory, name))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)  # only left when something failed before the rename


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "name": {"type": "str", "required": True},
            "directory": {"type": "path", "default": "/etc/qubes/policy.d"},
            "state": {"type": "str", "default": "present", "choices": ["present", "absent"]},
            "rules": {"type": "list", "elements": "raw", "default": []},
            "header": {"type": "str", "default": DEFAULT_HEADER},
        },
        supports_check_mode=True,
    )
    name, directory = module.params["name"], module.params["directory"]
    if not _FILE_NAME.match(name):
        module.fail_json(
            msg=f"name: {name!r} must match [0-9a-z_.-]+.policy (qrexec ignores others)"
        )
    path = os.path.join(directory, name)
    before = _read(path)
    after = None
    if module.params["state"] == "present":
        try:
            after = render(module.params["header"], module.params["rules"])
        except ValueError as error:
            module.fail_json(msg=str(error))
    if before == after:
        module.exit_json(changed=False, path=path)
    # The whole policy must still load with the new file: one broken file denies every call.
    directories = POLICY_DIRECTORIES if directory in POLICY_DIRECTORIES else (directory,)
    try:
        Policy.load(directories, replacing={path: after})
    except PolicySyntaxError as error:
        module.fail_json(msg=f"the policy would not load, so {path} was left as it was: {error}")
    if after is not None:
        _lint(module, directory, name, after)
    if not module.check_mode:
        if after is None:
            os.unlink(path)
        else:
            os.makedirs(directory, exist_ok=True)
            _install(directory, name, after)
    diff = {
        "before": before or "",
        "after": after or "",
        "before_header": path,
        "after_header": path,
    }
    module.exit_json(changed=True, path=path, diff=diff)


if __name__ == "__main__":
    main()
