# Copyright (c) qubes_infra.build contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
name: qubes
short_description: Become another user of a qube through qrexec, without sudo
version_added: 0.1.0
description:
  - With the P(qubes_infra.build.qubes#connection) connection, a task with C(become) runs over a
    qrexec stream of its own, opened as O(become_user) (C(qubes.VMRootShell) for V(root)). The
    qube is asked for nothing (no sudo, no su, no password). This is how a Qubes minimal template,
    which has no passwordless root (no C(qubes-core-agent-passwordless-root)), is reached as root.
  - Every command checks first that it runs as O(become_user), and stops with an error otherwise;
    so with any other connection a task fails instead of running as the connection's user.
options:
  become_user:
    description: The user to run as in the qube.
    type: str
    default: root
    ini:
      - section: privilege_escalation
        key: become_user
    vars:
      - name: ansible_become_user
    env:
      - name: ANSIBLE_BECOME_USER
    keyword:
      - name: become_user
notes:
  - From an admin qube (C(qrexec-client-vm)) only V(root) can be asked for; the dom0 policy's rule
    for C(qubes.VMRootShell) names C(user=root).
"""

EXAMPLES = r"""
# a play: root in a minimal template (no sudo there) for the tasks that ask for it; the hosts use
# the qubes_infra.build.qubes connection
- name: Packages of the build templates
  hosts: templates
  vars:
    ansible_become_method: qubes_infra.build.qubes
  tasks:
    - name: Git is installed
      become: true
      ansible.builtin.package:
        name: git
        state: present
"""

import shlex

from ansible.plugins.become import BecomeBase

NAME = "qubes_infra.build.qubes"


def user_check(user: str) -> str:
    """A shell line that ends the command unless it runs as `user`: the proof that the connection
    opened the stream as asked (any other connection would run it as its own user)."""
    quoted = shlex.quote(user)
    message = shlex.quote(
        f"become method {NAME} needs the {NAME} connection, which runs the command as {user}"
    )
    return f'[ "$(id -un)" = {quoted} ] || {{ echo {message} >&2; exit 1; }}'


class BecomeModule(BecomeBase):
    """Changes no command but for the check: the connection chooses the stream's user."""

    name = NAME

    def build_become_command(self, cmd: str, shell: object) -> str:
        super().build_become_command(cmd, shell)
        if not cmd:
            return cmd
        return f"{user_check(self.target_user())}; {cmd}"

    def target_user(self) -> str:
        """The user the connection opens the stream as, and the command checks it runs as."""
        return str(self.get_option("become_user") or "root")
