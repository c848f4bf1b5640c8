"""templates: the packages of every kind of qube the template serves, through its package
manager (which uses Qubes' updates proxy)."""

from __future__ import annotations

from typing import Any

testinfra_hosts = ["ansible://templates"]


def test_the_packages_of_every_kind_are_installed(host: Any) -> None:
    for package in ("git", "gnupg", "qubes-gpg-split", "nginx", "socat", "devscripts"):
        assert host.package(package).is_installed, package


def test_the_package_manager_goes_through_the_updates_proxy(host: Any) -> None:
    setting = host.file("/etc/apt/apt.conf.d/01qubes-proxy").content_string
    assert 'Acquire::http::Proxy "http://127.0.0.1:8082/";' in setting
