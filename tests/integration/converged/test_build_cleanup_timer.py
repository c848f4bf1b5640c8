"""The build qubes' cleanup timer fires: a user timer of the build qube's own systemd."""

from __future__ import annotations

import time

from tests.integration.converged.chain import Chain, in_qube

QUBE = "build-fedora"
LAST_RUN = "systemctl --user show -p ExecMainExitTimestampMonotonic --value builder-cleanup.service"


def _last_run() -> int:
    result = in_qube(QUBE, LAST_RUN)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip() or 0)


def test_the_cleanup_timer_fires_on_its_schedule(chain: Chain) -> None:
    short = chain.play(
        "--tags", "build_vm", "--limit", QUBE, "-e", "build_vm_cleanup_schedule=*:*:0/2"
    )
    try:
        assert short.returncode == 0, short.stdout + short.stderr
        before = _last_run()
        deadline = time.monotonic() + 60
        while _last_run() == before:
            assert time.monotonic() < deadline, "builder-cleanup.timer never fired"
            time.sleep(0.5)
        result = in_qube(QUBE, "systemctl --user show -p Result --value builder-cleanup.service")
        assert result.stdout.strip() == "success"
    finally:
        restored = chain.play("--tags", "build_vm", "--limit", QUBE)
        assert restored.returncode == 0, restored.stdout + restored.stderr
