"""The templates role's packages and package managers.

The build template (Fedora) has every package qubes-builder's check-depend asks for; the role knows
what Ansible's package modules need on each package manager of Qubes' templates, and reads the
installed packages with the package database's own tool, whose output it parses."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest
import yaml

from tests.unit.roles.rendering import ROLES, render_expression, role_file

# qubes-builder's check-depend (QubesOS/qubes-builder, Makefile at commit
# 571f0cd185ee91be87b696c07c0ea4b1f357da84): check-depend.rpm runs `rpm -q --whatprovides` on
# $(DEPENDENCIES): the Makefile's own list, rpm-sign (unless NO_SIGN=1) and DEPENDENCIES.rpm.
CHECK_DEPEND_MAKEFILE = [
    "git", "rpmdevtools", "rpm-build", "python3-sh", "wget", "perl-Digest-MD5",
    "perl-Digest-SHA", "systemd-container", "rpm-sign", "createrepo_c",
]  # fmt: skip
# ...with what the plugins of a release configuration add before check-depend runs (the Makefile
# includes each plugin's builder.conf), with USE_DIST_BUILD_TOOLS=1 (mock and pbuilder builds):
# QubesOS/qubes-builder-rpm builder.conf at ba8b28d386bdf124a8ac0c940eec50d098ff07f3 and
# QubesOS/qubes-builder-debian builder.conf at 47757b41ebc84cf88353009f03489ef69bc1f9a1.
CHECK_DEPEND_PLUGINS = {
    "builder-rpm": ["rpm-build", "mock"],
    "builder-debian": ["dpkg-dev", "debootstrap", "devscripts", "pbuilder"],
}
# Names check-depend asks for that another package provides on the build template's Fedora (41
# and later): QubesOS/qubes-infrastructure build-infra/template-build.sls at
# 6a8c8784b02887a419ab9057a953dad85954cd25 installs wget2-wget there.
PROVIDED_BY = {"wget": "wget2-wget"}


def packages() -> dict[str, Any]:
    return role_file("templates", "defaults/main.yml")["templates_packages"]


def test_the_fedora_build_template_passes_check_depend() -> None:
    build = set(packages()["build"]["RedHat"])
    plugins = [name for names in CHECK_DEPEND_PLUGINS.values() for name in names]
    wanted = CHECK_DEPEND_MAKEFILE + plugins
    missing = sorted({PROVIDED_BY.get(name, name) for name in wanted} - build)
    assert missing == [], f"check-depend would fail on the build template without {missing}"


def test_wget_comes_as_fedora_41_has_it() -> None:
    """A package named wget is not what Fedora 41 installs: listing it would ask for it again at
    every run (the role compares package names)."""
    build = packages()["build"]["RedHat"]
    assert "wget2-wget" in build and "wget" not in build and "wget2" not in build


def test_the_readme_says_which_distributions_build() -> None:
    readme = " ".join((ROLES / "templates/README.md").read_text().split())
    assert "the build template must be **Fedora 41 or later**" in readme
    assert all(f"`{name}`" in readme or name in readme for name in CHECK_DEPEND_MAKEFILE)


def managers() -> dict[str, Any]:
    return role_file("templates", "vars/main.yml")["_templates_package_managers"]


@pytest.mark.parametrize(("manager", "module"), [("dnf5", "dnf5"), ("dnf", "dnf"), ("apt", "apt")])
def test_the_library_is_what_the_package_module_requires(manager: str, module: str) -> None:
    """What the role installs first is the requirement ansible.builtin.package's backend
    declares on that package manager (ansible-core's module documentation)."""
    imported = __import__(f"ansible.modules.{module}", fromlist=["DOCUMENTATION"])
    requirements = yaml.safe_load(imported.DOCUMENTATION)["requirements"]
    library = managers()[manager]["library"]
    # ansible-core 2.16's dnf module still names Python 2's package (python-dnf).
    named = {requirement.split()[0].replace("python-", "python3-") for requirement in requirements}
    assert len(library) == 1 and library[0] in named, requirements


def test_every_manager_lists_installs_and_names_its_library() -> None:
    for name, manager in managers().items():
        assert set(manager) == {"list", "library", "install"}, name
        assert manager["install"][-1] in ("--", "sh"), name


def installed(lines: list[str]) -> list[str]:
    text = role_file("templates", "vars/main.yml")["_templates_installed"]
    return render_expression(text, __templates_listing={"stdout_lines": lines})


def test_the_listing_keeps_installed_packages_only() -> None:
    lines = [
        "installed git",
        "config-files nginx",
        "not-installed rpm",
        "half-configured mock",
        "installed python3-apt",
        "installed",
        "installed two words",
    ]
    assert installed(lines) == ["git", "python3-apt"]
    assert installed([]) == []


@pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="needs dpkg-query")
def test_dpkg_query_prints_what_the_role_parses() -> None:
    listing = subprocess.run(
        managers()["apt"]["list"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    names = installed(listing)
    assert "dpkg" in names and len(names) == sum(line.startswith("installed ") for line in listing)


@pytest.mark.skipif(shutil.which("rpm") is None, reason="needs rpm")
def test_rpm_takes_the_query_format() -> None:
    """rpm accepts the role's query (a machine without an rpm database lists nothing)."""
    listed = subprocess.run(managers()["dnf5"]["list"], capture_output=True, text=True, check=False)
    assert listed.returncode == 0, listed.stderr
    assert all(line.startswith("installed ") for line in listed.stdout.splitlines())
