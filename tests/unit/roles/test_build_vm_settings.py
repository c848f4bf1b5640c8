"""The build_vm role's rendered settings: ~/builder-github.conf carries what the Salt formula's
build-infra/builder-github.conf carries, and make reads it as qubes-builder does; the build
services get the build log command; ~/.ssh/known_hosts pins github.com's published host keys."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.unit.roles.rendering import render_template, role_file

SIGN_KEY = "0123456789ABCDEF0123456789ABCDEF01234567"
ENVIRONMENT = {"keys_vm": "keys-fedora"}
# The settings QubesOS/qubes-infrastructure's build-infra/builder-github.conf sets (commit
# 6a8c8784b02887a419ab9057a953dad85954cd25), with the defaults it gives them. GITHUB_API_KEY has
# none there (a pillar value): the role writes it only when given.
UPSTREAM_SETTINGS = {
    "BUILDER_PLUGINS": "builder-github",
    "GITHUB_STATE_DIR": "$(HOME)/github-notify-state",
    "GITHUB_BUILD_REPORT_REPO": "QubesOS/updates-status",
    "GITHUB_BUILD_ISSUES_REPO": "QubesOS/build-issues",
    "GITHUB_LOGS_REPO": "QubesOS/build-logs",
    "GIT_URL_builder_github": "https://github.com/QubesOS/qubes-builder-github",
    "BRANCH_builder_github": "master",
}
# GitHub's published fingerprints of github.com's host keys: "GitHub's SSH key fingerprints",
# https://docs.github.com/en/authentication/keeping-your-account-and-data-secure/
# githubs-ssh-key-fingerprints
GITHUB_FINGERPRINTS = {
    "RSA": "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s",
    "ECDSA": "SHA256:p2QAMXNIC1TJYWeIOttrVc98/R1BUFWu3/LiyKgUfQM",
    "ED25519": "SHA256:+DiY3wvvV6TuJJhbpZisF/zLDA0zPMSvHdkr4UvCOqU",
}
# An ed25519 key of 32 bytes 0..31 (well formed, nobody's).
UPLOAD_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f"


def builder_github_conf(**variables: object) -> str:
    values: dict[str, object] = {
        "_build_vm_env": ENVIRONMENT,
        "__build_vm_builds_sign_key": SIGN_KEY,
        **variables,
    }
    return render_template("build_vm", "builder-github.conf.j2", **values)


def assignments(text: str) -> dict[str, str]:
    """NAME = value and NAME += value lines of a make file (the last one of a name wins)."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        for operator in (" += ", " = "):
            name, sep, value = line.partition(operator)
            if sep and name.isidentifier():
                found[name] = value
                break
    return found


def make_values(
    directory: Path, builder_conf: str, names: list[str], environment: dict[str, str]
) -> dict[str, str]:
    """What make gives the variables when builder.conf is read as qubes-builder's Makefile reads
    it (an include of the makefile, then the variables' use)."""
    (directory / "builder.conf").write_text(builder_conf)
    printing = "".join(f"$(info {name}=$({name}))\n" for name in names) + "values: ;\n"
    result = subprocess.run(
        ["make", "-s", "--no-print-directory", "-f", "builder.conf", "-f", "-", "values"],
        input=printing,
        cwd=directory,
        env={"PATH": os.environ["PATH"], "HOME": str(directory), **environment},
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(line.split("=", 1) for line in result.stdout.splitlines())


def test_the_settings_are_upstreams_with_its_defaults() -> None:
    written = assignments(builder_github_conf())
    for name, value in UPSTREAM_SETTINGS.items():
        assert written.get(name) == value, name
    assert written["SIGN_KEY"] == SIGN_KEY
    assert "GITHUB_API_KEY" not in written
    # make-with-log never sees a make variable: the log command is in the services' environment.
    assert "QUBES_BUILD_LOG_CMD" not in written


def test_every_setting_is_a_declared_role_variable() -> None:
    defaults = role_file("build_vm", "defaults/main.yml")
    specs = role_file("build_vm", "meta/argument_specs.yml")["argument_specs"]["main"]["options"]
    for name in (
        "build_vm_builder_github_url",
        "build_vm_builder_github_branch",
        "build_vm_github_state_dir",
        "build_vm_github_build_report_repo",
        "build_vm_github_build_issues_repo",
        "build_vm_github_logs_repo",
        "build_vm_github_api_key",
        "build_vm_github_host_keys",
    ):
        assert name in defaults and specs[name]["description"], name
        if "default" in specs[name]:
            assert specs[name]["default"] == defaults[name], name
    assert specs["build_vm_github_api_key"]["no_log"] is True


def test_given_settings_are_written() -> None:
    written = assignments(
        builder_github_conf(
            build_vm_github_state_dir="/srv/notify",
            build_vm_github_build_report_repo="example/reports",
            build_vm_github_api_key="ghp_0123456789abcdefABCDEF0123456789abcd",
            __build_vm_builds_sign_key="",
        )
    )
    assert written["GITHUB_STATE_DIR"] == "/srv/notify"
    assert written["GITHUB_BUILD_REPORT_REPO"] == "example/reports"
    assert written["GITHUB_API_KEY"] == "ghp_0123456789abcdefABCDEF0123456789abcd"
    assert "SIGN_KEY" not in written


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_reads_the_settings_as_qubes_builder_does(tmp_path: Path) -> None:
    """builder-github joins the components a release configuration names, not those a command
    gives make in its environment (auto-build's COMPONENTS=COMPONENT)."""
    (tmp_path / "builder-github.conf").write_text(builder_github_conf())
    conf = (
        "COMPONENTS ?= core-admin gui-daemon\n"
        "BUILDER_PLUGINS = builder-rpm\n"
        "include $(HOME)/builder-github.conf\n"
    )
    names = ["COMPONENTS", "BUILDER_PLUGINS", "GITHUB_STATE_DIR", "SIGN_KEY", "GITHUB_LOGS_REPO"]
    values = make_values(tmp_path, conf, names, {})
    assert values == {
        "COMPONENTS": "core-admin gui-daemon builder-github",
        "BUILDER_PLUGINS": "builder-rpm builder-github",
        "GITHUB_STATE_DIR": f"{tmp_path}/github-notify-state",
        "SIGN_KEY": SIGN_KEY,
        "GITHUB_LOGS_REPO": "QubesOS/build-logs",
    }
    one = make_values(tmp_path, conf, ["COMPONENTS"], {"COMPONENTS": "core-admin"})
    assert one == {"COMPONENTS": "core-admin"}


def test_the_services_get_the_build_log_command() -> None:
    rendered = render_template(
        "build_vm",
        "build-services.json.j2",
        build_infra={"netvm": "sys-net"},
        build_vm_command_signers={},
    )
    settings = json.loads(rendered)
    assert settings["build_log_command"] == "qrexec-client-vm dom0 qubesbuilder.BuildLog"
    changed = render_template(
        "build_vm",
        "build-services.json.j2",
        build_infra={"netvm": "sys-net"},
        build_vm_command_signers={},
        build_vm_build_log_command="cat > /dev/null",
    )
    assert json.loads(changed)["build_log_command"] == "cat > /dev/null"


def known_hosts(**variables: object) -> list[str]:
    values: dict[str, object] = {
        "build_infra_remote_hosts": {"yum.qubes-os.org": {"user": "user", "host_key": UPLOAD_KEY}},
        **variables,
    }
    return [line for line in render_template("build_vm", "known_hosts.j2", **values).split("\n")]


def test_known_hosts_pins_the_upload_hosts_and_github() -> None:
    lines = [line for line in known_hosts() if line]
    assert lines[0] == f"yum.qubes-os.org {UPLOAD_KEY}"
    github = [line.split() for line in lines if line.startswith("github.com ")]
    assert [words[1] for words in github] == ["ssh-ed25519", "ecdsa-sha2-nistp256", "ssh-rsa"]
    assert all(len(words) == 3 for words in github)
    # A user's keys replace the defaults.
    mine = known_hosts(build_infra_remote_hosts={}, build_vm_github_host_keys=[UPLOAD_KEY])
    assert [line for line in mine if line] == [f"github.com {UPLOAD_KEY}"]


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")
def test_the_github_keys_are_githubs_published_ones(tmp_path: Path) -> None:
    """ssh reads the rendered lines, and each key has the fingerprint GitHub publishes."""
    path = tmp_path / "known_hosts"
    path.write_text("\n".join(known_hosts()) + "\n")
    found = subprocess.run(
        ["ssh-keygen", "-F", "github.com", "-f", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert len([line for line in found.splitlines() if line.startswith("github.com ")]) == 3
    listed = subprocess.run(
        ["ssh-keygen", "-l", "-f", str(path)], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    fingerprints = {
        line.split()[-1].strip("()"): line.split()[1] for line in listed if " github.com " in line
    }
    assert fingerprints == GITHUB_FINGERPRINTS


# -- qubes-builderv2: refused until the collection creates what it needs --------------------------
V2_WHY = (
    "needs a disposable builder template and dom0 policy (C(admin.vm.CreateDisposable),"
    " C(admin.vm.Start), C(admin.vm.Kill), C(qubes.Filecopy), C(qubesbuilder.FileCopyIn) and"
    " C(qubesbuilder.FileCopyOut)"
)


def test_the_builder_version_accepts_1_only_and_says_why() -> None:
    from ansible.module_utils.common.arg_spec import ArgumentSpecValidator

    specs = role_file("build_vm", "meta/argument_specs.yml")["argument_specs"]["main"]["options"]
    spec = specs["build_vm_builder_version"]
    assert (spec["type"], spec["choices"], spec["default"]) == ("int", [1], 1)
    assert role_file("build_vm", "defaults/main.yml")["build_vm_builder_version"] == 1
    description = " ".join(spec["description"])
    assert "2 (qubes-builderv2) is refused" in description
    assert "use 1" in description
    assert V2_WHY in description
    # What Ansible checks before the role runs (its role argument validation).
    validator = ArgumentSpecValidator({"build_vm_builder_version": spec})
    refused = validator.validate({"build_vm_builder_version": 2})
    assert [str(error) for error in refused.errors] == [
        "value of build_vm_builder_version must be one of: 1, got: 2"
    ]
    accepted = validator.validate({"build_vm_builder_version": "1"})
    assert [str(error) for error in accepted.errors] == []
    assert accepted.validated_parameters["build_vm_builder_version"] == 1


def test_builders_list_has_qubes_builder_lines_only() -> None:
    """Format 1, rRELEASE=DIR, whatever the builder's configuration file: the services read no
    other line."""
    environment = {
        "builders": [
            {"release": "4.2", "dir": "/home/user/builder-r4.2", "config_file": "R4.2/host.conf"},
            {"release": "4.3", "dir": "/home/user/builder-r4.3", "config_file": "R4.3/host.conf"},
        ]
    }
    rendered = render_template("build_vm", "builders.list.j2", _build_vm_env=environment)
    assert rendered.splitlines()[1:] == [
        "r4.2=/home/user/builder-r4.2",
        "r4.3=/home/user/builder-r4.3",
    ]


def test_the_services_settings_name_no_builder_version() -> None:
    """The services run qubes-builder only: no setting could make them run qubes-builderv2."""
    settings = json.loads(
        render_template(
            "build_vm",
            "build-services.json.j2",
            build_infra={"netvm": "sys-net"},
            build_vm_command_signers={},
        )
    )
    assert "builder_version" not in settings
