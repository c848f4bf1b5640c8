"""The persistent_folder test: which folders of a qube persist in an AppVM."""

from __future__ import annotations

import pytest
from ansible_collections.qubes_infra.build.plugins.test.persistent_folder import persistent_folder


@pytest.mark.parametrize(
    "folder",
    [
        "/usr/local/lib/qubes-infra-build",
        "/home/user",
        "/home/user/.local/state/x_y-1.2",
        "/rw/qubes-infra-build/etc",
    ],
)
def test_the_rule_accepts_what_persists(folder: str) -> None:
    assert persistent_folder(folder)


@pytest.mark.parametrize(
    "folder",
    [
        "/etc/qubes-infra-build",  # the root volume of an AppVM: gone at shutdown
        "/var/lib/qubes-infra-build",
        "/usr/lib/qubes-infra-build",
        "/usr/local",  # the persistent folders themselves, not a folder of the role
        "/home",
        "/usr/localx/lib",
        "/rwx/lib",
        "/home/user/../../etc",
        "/home/./user",
        "/home/user/",
        "/home//user",
        "home/user",
        "~/lib",
        "/home/user dir",
        "/home/user\n",
        "/home/user;rm",
        "/home/$USER",
    ],
)
def test_the_rule_refuses_anything_else(folder: str) -> None:
    assert not persistent_folder(folder)


@pytest.mark.parametrize("value", [None, 1, ["/home/user"], b"/home/user"])
def test_anything_but_text_is_not_a_folder(value: object) -> None:
    assert not persistent_folder(value)
