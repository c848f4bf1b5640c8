"""A qube boots as a Qubes AppVM boots: the distribution's systemd as its init, Qubes' order.

Upstream: qubes-core-agent-linux (branches release4.2, release4.3) vm-systemd/qubes-sysinit.sh
(qubesdb and /run/qubes-service/NAME before any unit), vm-systemd/qubes-misc-post.service and
misc-post.sh (/rw/config/rc.local after networking), vm-systemd/75-qubes-vm.preset (what a template
enables); qubes-core-qrexec systemd/qubes-qrexec-agent.service (qvm-start returns once the agent is
up); qubes-core-admin qubes/vm/qubesvm.py shutdown() (a qube gets shutdown_timeout to stop, then is
killed).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from qubesim import runtime
from tests.integration.conftest import Qvm

UNITS = "/usr/local/lib/systemd/system"


def _sh(qvm: Qvm, qube: str, command: str, user: str = "root", check: bool = True) -> str:
    return qvm("qvm-run", "--pass-io", "--user", user, qube, command, check=check).stdout


def _wait_for(qvm: Qvm, qube: str, command: str, seconds: float = 30) -> str:
    """Poll a command in the qube until it succeeds (units start after qvm-start returns)."""
    deadline = time.monotonic() + seconds
    while True:
        result = qvm("qvm-run", "--pass-io", "--user", "root", qube, command, check=False)
        if result.returncode == 0 or time.monotonic() > deadline:
            assert result.returncode == 0, f"{command!r} in {qube}: {result.stderr}"
            return result.stdout
        time.sleep(0.2)


def _write_unit(qvm: Qvm, qube: str, name: str, text: str, directory: str = UNITS) -> None:
    command = f"mkdir -p {directory} && cat > {directory}/{name}"
    qvm("qvm-run", "--pass-io", "--user", "root", qube, command, input=text)


def _restart_with_rc_local(qvm: Qvm, qube: str, script: str) -> None:
    """Give the qube an rc.local, restart it and wait until qubes-misc-post has run it."""
    qvm("qvm-run", "--pass-io", "-u", "root", qube, "cat > /rw/config/rc.local", input=script)
    _sh(qvm, qube, "chmod +x /rw/config/rc.local")
    qvm("qvm-shutdown", "--wait", qube)
    qvm("qvm-start", qube)
    _wait_for(qvm, qube, "systemctl is-active qubes-misc-post.service")


def test_systemd_is_init_and_the_qube_boots_with_no_failed_unit(qvm: Qvm, appvm: str) -> None:
    qvm("qvm-start", appvm)
    assert _sh(qvm, appvm, "cat /proc/1/comm") == "systemd\n"
    state = _wait_for(qvm, appvm, "systemctl is-system-running --wait")
    assert state == "running\n"
    assert _sh(qvm, appvm, "systemctl list-units --failed --no-legend --plain") == ""
    # The agent is up when qvm-start returns, as Qubes' qrexec agent is.
    assert _sh(qvm, appvm, "systemctl is-active qubes-qrexec-agent.service") == "active\n"


def test_many_qubes_systemd_find_the_inotify_instances_they_need(qvm: Qvm, appvm: str) -> None:
    """Each qube's systemd and its services hold inotify instances, counted for root across the
    machine; at the kernel's default (128) a few hosts' qubes spend them and the next systemd
    exits while booting. Starting a qube makes sure the machine allows many."""
    qvm("qvm-start", "--skip-if-running", appvm)
    allowed = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
    assert allowed >= runtime.INOTIFY_INSTANCES


def test_the_hosts_services_are_not_enabled_in_qubes(qvm: Qvm, appvm: str) -> None:
    """qubesim's templates are made from the host's root; its own services (an sshd, a web
    server) are no part of a Qubes template and would fight over the one loopback."""
    enabled = _sh(qvm, appvm, "systemctl list-unit-files --state=enabled --no-legend --plain")
    names = {line.split()[0] for line in enabled.splitlines()}
    assert {"qubes-qrexec-agent.service", "qubes-misc-post.service"} <= names
    assert not names & {"ssh.service", "nginx.service", "tinyproxy.service"}


def test_qvm_service_flags_are_set_before_units_start(qvm: Qvm, appvm: str) -> None:
    """A unit conditioned on /run/qubes-service/NAME runs only where the flag is on."""
    unit = (
        "[Unit]\nConditionPathExists=/run/qubes-service/qubesim-flag\n"
        "[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/true\n"
    )
    _write_unit(qvm, appvm, "qubesim-flag.service", unit)
    rc_local = "#!/bin/sh\nsystemctl start qubesim-flag.service\n"
    _restart_with_rc_local(qvm, appvm, rc_local)
    assert _sh(qvm, appvm, "systemctl is-active qubesim-flag.service", check=False) != "active\n"
    qvm("qvm-shutdown", "--wait", appvm)
    qvm("qvm-service", "--enable", appvm, "qubesim-flag")
    qvm("qvm-start", appvm)
    assert _wait_for(qvm, appvm, "systemctl is-active qubesim-flag.service") == "active\n"


def test_rc_local_runs_after_networking_as_qubes_misc_post(qvm: Qvm, appvm: str) -> None:
    rc_local = "#!/bin/sh\ngrep name=systemd /proc/self/cgroup > /rw/rc-local-ran-in\n"
    _restart_with_rc_local(qvm, appvm, rc_local)
    after = _sh(qvm, appvm, "systemctl show -p After --value qubes-misc-post.service")
    assert {"network-pre.target", "qubes-network.service"} <= set(after.split())
    assert _sh(qvm, appvm, "cat /rw/rc-local-ran-in").endswith("/qubes-misc-post.service\n")


def test_the_users_systemd_instance_runs_their_units_from_home(qvm: Qvm, appvm: str) -> None:
    """`user`'s instance starts at boot (lingering) and reads ~/.config/systemd/user."""
    home_units = "/home/user/.config/systemd/user"
    unit = (
        "[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/true\n"
        "[Install]\nWantedBy=default.target\n"
    )
    _sh(qvm, appvm, f"mkdir -p {home_units}/default.target.wants", user="user")
    qvm("qvm-run", "--pass-io", appvm, f"cat > {home_units}/mine.service", input=unit)
    _sh(qvm, appvm, f"ln -s ../mine.service {home_units}/default.target.wants/", user="user")
    qvm("qvm-shutdown", "--wait", appvm)
    qvm("qvm-start", appvm)
    active = _wait_for(
        qvm,
        appvm,
        "runuser -u user -- env XDG_RUNTIME_DIR=/run/user/1000"
        " systemctl --user is-active mine.service",
    )
    assert active == "active\n"


def test_a_service_with_restart_always_comes_back_after_kill_9(qvm: Qvm, appvm: str) -> None:
    unit = "[Service]\nExecStart=/bin/sleep infinity\nRestart=always\nRestartSec=0.2\n"
    _write_unit(qvm, appvm, "qubesim-restart.service", unit)
    _sh(qvm, appvm, "systemctl daemon-reload && systemctl start qubesim-restart.service")
    first = _sh(qvm, appvm, "systemctl show -p MainPID --value qubesim-restart.service").strip()
    _sh(qvm, appvm, f"kill -9 {first}")
    second = _wait_for(
        qvm,
        appvm,
        "pid=$(systemctl show -p MainPID --value qubesim-restart.service);"
        f' [ "$pid" != 0 ] && [ "$pid" != {first} ] && echo "$pid"',
    )
    assert second.strip() not in ("", first)


def test_a_timer_fires(qvm: Qvm, appvm: str) -> None:
    service = "[Service]\nType=oneshot\nExecStart=/bin/sh -c 'echo fired >> /rw/timer-fired'\n"
    timer = "[Timer]\nOnActiveSec=1\nOnUnitActiveSec=1\nAccuracySec=100ms\n"
    _write_unit(qvm, appvm, "qubesim-tick.service", service)
    _write_unit(qvm, appvm, "qubesim-tick.timer", timer)
    _sh(qvm, appvm, "systemctl daemon-reload && systemctl start qubesim-tick.timer")
    fired = _wait_for(qvm, appvm, "[ $(wc -l < /rw/timer-fired) -ge 2 ] && cat /rw/timer-fired")
    assert fired.splitlines()[:2] == ["fired", "fired"]


def test_shutdown_stops_units_in_order_then_kills_past_shutdown_timeout(
    qvm: Qvm, appvm: str
) -> None:
    """A unit's ExecStop runs at shutdown; one that never stops is killed with the qube once
    shutdown_timeout is past."""
    stopping = (
        "[Unit]\nAfter=qubes-qrexec-agent.service\n"
        "[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/true\n"
        "ExecStop=/bin/sh -c 'echo stopped > /rw/stop-ran'\n"
    )
    _write_unit(qvm, appvm, "qubesim-stop.service", stopping)
    _sh(qvm, appvm, "systemctl daemon-reload && systemctl start qubesim-stop.service")
    qvm("qvm-shutdown", "--wait", appvm)
    qvm("qvm-start", appvm)
    assert _sh(qvm, appvm, "cat /rw/stop-ran") == "stopped\n"

    stubborn = (
        "[Service]\nExecStart=/bin/sh -c 'trap \"\" TERM; while :; do sleep 1; done'\n"
        "KillMode=mixed\nTimeoutStopSec=infinity\n"
    )
    _write_unit(qvm, appvm, "qubesim-stubborn.service", stubborn)
    _sh(qvm, appvm, "systemctl daemon-reload && systemctl start qubesim-stubborn.service")
    qvm("qvm-prefs", appvm, "shutdown_timeout", "2")
    qvm("qvm-shutdown", appvm)
    deadline = time.monotonic() + 60
    while qvm("qvm-check", "--quiet", "--running", appvm, check=False).returncode == 0:
        assert time.monotonic() < deadline, "the qube outlived its shutdown_timeout"
        time.sleep(0.2)


def test_a_qube_that_never_boots_is_reported(qvm: Qvm, new_name: Callable[[], str]) -> None:
    """qvm-start fails, and says so, when the qube's init cannot run (here: a template whose
    systemd is gone)."""
    template, app = new_name(), new_name()
    qvm("qvm-create", "--class", "TemplateVM", "--label", "black", template)
    qvm("qvm-create", "--label", "red", "--template", template, "--property", "netvm=", app)
    _sh(qvm, template, "rm /lib/systemd/systemd")
    qvm("qvm-shutdown", "--wait", template)
    result = qvm("qvm-start", app, check=False)
    assert result.returncode != 0
    assert app in result.stderr and "systemd" in result.stderr
