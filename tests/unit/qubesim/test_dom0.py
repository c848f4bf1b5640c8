"""dom0 as a machine of its own: each simulated dom0 has a home of its own, as each real dom0 has,
so two hosts run side by side never share what programs keep there (such as the connection
plugin's sockets, which are named after the qube and would otherwise reach the other host's qube
of the same name); and a dom0 is never started for a host that does not exist (a command still
running while `qubesim destroy` removes the host fails instead of leaving half a host)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from qubesim.dom0 import dom0_environment, ensure_holder
from qubesim.errors import QubesimError
from qubesim.layout import Layout


def test_dom0_commands_get_the_home_of_their_own_host(tmp_path: Path) -> None:
    first, second = Layout(tmp_path / "first"), Layout(tmp_path / "second")
    homes = {dom0_environment(layout)["HOME"] for layout in (first, second)}
    assert homes == {str(first.dom0_home), str(second.dom0_home)}
    assert all(Path(home).is_relative_to(tmp_path) for home in homes)


def test_the_home_is_made_with_the_host_and_private_to_root(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "host")
    layout.create()
    assert stat.S_IMODE(layout.dom0_home.stat().st_mode) == 0o700


def test_no_dom0_is_started_for_a_host_that_does_not_exist(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "gone")
    with pytest.raises(QubesimError, match=f"no simulated Qubes host at {layout.home}"):
        ensure_holder(layout)
    assert not layout.home.exists()
