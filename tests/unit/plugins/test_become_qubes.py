"""The qubes become method's check, run by a real shell: a command runs only as the user asked.
(How Ansible loads the plugin and picks the stream is tested through ansible itself, in
tests/integration/plugins/connection/test_root.py.)"""

from __future__ import annotations

import getpass
import subprocess

from ansible_collections.qubes_infra.build.plugins.become.qubes import NAME, user_check


def run(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, check=False)


def test_the_command_runs_as_the_user_asked_for() -> None:
    result = run(f"{user_check(getpass.getuser())}; echo ran; exit 3")
    assert (result.returncode, result.stdout, result.stderr) == (3, "ran\n", "")


def test_the_command_stops_as_any_other_user() -> None:
    result = run(f"{user_check('nobody-at-all')}; echo ran")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"become method {NAME} needs the {NAME} connection, which runs the command as"
        " nobody-at-all\n"
    )


def test_a_user_name_is_never_run_as_code() -> None:
    result = run(f"{user_check('x; touch /tmp/never-made-by-user-check')}; echo ran")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "touch" in result.stderr
