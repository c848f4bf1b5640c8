#!/usr/bin/python
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: build_infra_source
short_description: Refuse build_infra variables that do not come from the inventory's description
version_added: 0.2.0
description:
  - Compares every C(build_infra_*) variable and C(build_infra), as Ansible resolves them for the
    host in this task (extra vars, play vars, vars files, host_vars and group_vars all applied),
    with the values the P(qubes_infra.build.build_envs#inventory) plugin gives the host from the
    C(group_vars/all) files next to the inventory. Those values are made again from the same files
    with the plugin's own code, so no other source can stand in for them.
  - On any difference it fails, naming each variable, the host and the source whose value won
    (C(-e @FILE) or C(-e) on the command line, the play's vars file, play vars, or the host_vars
    or group_vars file), and says to put the setting in the files the inventory plugin reads.
    When a source cannot be told, the message says it is not from the inventory's files.
  - The collection's preflight playbook runs it on every host of the run before any play changes
    anything, so a run applies one infrastructure or none.
  - Runs on the controller only; the host is not contacted.
author:
  - qubes_infra.build maintainers (!UNKNOWN)
options: {}
attributes:
  check_mode:
    description: Checks as in a normal run; it never changes anything.
    support: full
  diff_mode:
    description: Nothing changes, so there is no diff.
    support: none
notes:
  - A play's own C(vars) or C(vars_files) apply to that play only; they are seen when the task runs
    in the same play (the preflight runs in its own plays, where a wrapper's C(import_playbook)
    C(vars) are seen).
"""

EXAMPLES = r"""
- name: Refuse build_infra settings from anywhere but the inventory
  qubes_infra.build.build_infra_source:
"""

RETURN = r"""
differing:
  description: The variables whose resolved value differs from the inventory's, when refused.
  returned: failure
  type: list
  elements: str
  sample: [build_infra_envs]
"""
