"""Qubes' persistence rules: what survives a restart, and what a template change reaches."""

from __future__ import annotations

from collections.abc import Callable

from tests.integration.conftest import Qvm


def _sh(qvm: Qvm, qube: str, command: str, user: str = "user") -> str:
    return qvm("qvm-run", "--pass-io", "--user", user, qube, command).stdout


def test_appvm_root_is_reset_but_private_data_persists(qvm: Qvm, appvm: str) -> None:
    _sh(qvm, appvm, "echo volatile > /etc/marker && echo private > /rw/marker", user="root")
    _sh(
        qvm,
        appvm,
        "echo home > /home/user/marker"
        " && mkdir -p /usr/local/share && echo local > /usr/local/share/marker",
        user="root",
    )
    qvm("qvm-shutdown", "--wait", appvm)
    qvm("qvm-start", appvm)
    after = _sh(
        qvm,
        appvm,
        "for f in /etc/marker /rw/marker /home/user/marker /usr/local/share/marker;"
        " do cat $f 2>/dev/null || echo missing; done",
    )
    assert after.split() == ["missing", "private", "home", "local"]


def test_template_changes_reach_appvms_after_restart(qvm: Qvm, new_name: Callable[[], str]) -> None:
    template, app = new_name(), new_name()
    qvm("qvm-create", "--class", "TemplateVM", "--label", "black", template)
    qvm("qvm-create", "--label", "green", "--template", template, app)
    assert "missing" in _sh(qvm, app, "cat /etc/from-template 2>/dev/null || echo missing")
    _sh(qvm, template, "echo installed > /etc/from-template", user="root")
    qvm("qvm-shutdown", "--wait", template, app)
    assert _sh(qvm, app, "cat /etc/from-template") == "installed\n"
    # The template keeps its own root across restarts.
    assert _sh(qvm, template, "cat /etc/from-template") == "installed\n"


def test_rc_local_runs_at_start(qvm: Qvm, appvm: str) -> None:
    _sh(
        qvm,
        appvm,
        "mkdir -p /rw/config"
        " && printf '#!/bin/sh\\nhostname > /run/rc-local-ran\\n' > /rw/config/rc.local"
        " && chmod +x /rw/config/rc.local",
        user="root",
    )
    qvm("qvm-shutdown", "--wait", appvm)
    assert _sh(qvm, appvm, "cat /run/rc-local-ran") == f"{appvm}\n"


def test_qubes_keep_running_between_dom0_commands(qvm: Qvm, appvm: str) -> None:
    qvm("qvm-start", appvm)
    assert qvm("qvm-check", "--running", "--quiet", appvm).returncode == 0
    # A second, separate dom0 command sees the qube still running with the same processes.
    first = _sh(qvm, appvm, "sleep 1000 >/dev/null 2>&1 & echo $!").strip()
    assert _sh(qvm, appvm, f"kill -0 {first} && echo alive") == "alive\n"
