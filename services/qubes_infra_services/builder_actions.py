# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""What a builder runs for a build or an accepted command, as builder-github has it run.

qubes-builder (builders.list format 1) is driven by its scripts, as qubes-builder-github does:
`scripts/auto-build COMPONENT`, `scripts/make-with-log update-repo-REPOSITORY` (first making the
repository, then uploading it) and `scripts/auto-build-template`. qubes-builderv2 is not run: it
needs a disposable template and Admin API policy the collection does not create yet, so ISOs,
which only qubes-builderv2 builds, are built nowhere here.

An upload is bound to what was built: the component's checked-out sources (DIR/qubes-src/COMPONENT)
must be at the signed commit, and a template's built version and timestamp must be the signed ones.
"""

from __future__ import annotations

import os
import subprocess

from qubes_infra_services.builder_instances import Builder, Step, find_component
from qubes_infra_services.command_grammar import Command

MAKE_WITH_LOG = "scripts/make-with-log"


class NotForThisBuilder(Exception):
    """This builder does not take the command (another one may); the text says why."""


def build_steps(builder: Builder, component: str) -> list[Step]:
    """A component's whole build (TriggerBuild)."""
    return [Step((os.path.join(builder.directory, "scripts/auto-build"), component))]


def _source_commit(directory: str) -> str:
    try:
        result = subprocess.run(
            ["git", "-C", directory, "rev-parse", "--verify", "HEAD^{commit}"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def _require_commit(builder: Builder, command: Command) -> None:
    directory = os.path.join(builder.directory, "qubes-src", command.component)
    found = _source_commit(directory)
    if found != command.commit:
        raise NotForThisBuilder(
            f"{command.component} in {builder.directory} is at {found or 'no commit'},"
            f" not at the signed {command.commit}"
        )


def _make_repository_steps(
    builder: Builder, repository: str, variables: dict[str, str]
) -> list[Step]:
    """qubes-builder's two passes: make the repository, then upload it."""
    argv = (os.path.join(builder.directory, MAKE_WITH_LOG), f"update-repo-{repository}")
    return [
        Step(argv, tuple(sorted({**variables, "MAKEREPO": "1", "UPLOAD": "0"}.items()))),
        Step(argv, tuple(sorted({**variables, "MAKEREPO": "0", "UPLOAD": "1"}.items()))),
    ]


def _v1_distributions(distributions: tuple[str, ...] | None) -> dict[str, str]:
    """qubes-builder's DISTS_VM / DIST_DOM0 for the requested distributions (None: the
    builder's own)."""
    if distributions is None:
        return {}
    vm = [name.removeprefix("vm-") for name in distributions if name.startswith("vm-")]
    host = [name.removeprefix("host-") for name in distributions if name.startswith("host-")]
    return {"DISTS_VM": " ".join(vm), "DIST_DOM0": " ".join(host)}


def _upload_component(
    builder: Builder, command: Command, distributions: tuple[str, ...] | None
) -> list[Step]:
    _require_commit(builder, command)
    variables = {"COMPONENTS": command.component, **_v1_distributions(distributions)}
    return _make_repository_steps(builder, command.repository, variables)


def _built_template_version(builder: Builder, template: str) -> str:
    """qubes-builder's record of a built template: version file and build timestamp."""
    sources = os.path.join(builder.directory, "qubes-src", "linux-template-builder")
    try:
        with open(os.path.join(sources, "version"), encoding="ascii") as version:
            number = version.read(64).strip()
        with open(os.path.join(sources, f"build_timestamp_{template}"), encoding="ascii") as stamp:
            built = stamp.read(64).strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f"{number}-{built}"


def _upload_template(builder: Builder, command: Command) -> list[Step]:
    built = _built_template_version(builder, command.template)
    if built != command.version:
        raise NotForThisBuilder(
            f"template {command.template} in {builder.directory} is {built or 'not built'},"
            f" not the signed {command.version}"
        )
    variables = {"COMPONENTS": "linux-template-builder", "DISTS_VM": command.template}
    return _make_repository_steps(builder, command.repository, variables)


def _build_template(builder: Builder, command: Command) -> list[Step]:
    script = os.path.join(builder.directory, "scripts/auto-build-template")
    return [Step((script, command.template, command.timestamp))]


def _build_iso(builder: Builder) -> list[Step]:
    raise NotForThisBuilder(
        f"qubes-builder in {builder.directory} does not build ISOs (qubes-builderv2 does, which"
        " this collection does not run yet)"
    )


def command_steps(
    builder: Builder,
    command: Command,
    distributions: tuple[str, ...] | None,
    timeout: float,
) -> tuple[str, list[Step]]:
    """What `builder` runs for an accepted command, and the name its log is kept under;
    NotForThisBuilder when it does not take it."""
    if "r" + builder.release != command.release:
        raise NotForThisBuilder(f"{builder.directory} builds release r{builder.release}")
    if command.kind == "Upload-component":
        if find_component(builder, command.component, timeout) != command.component:
            raise NotForThisBuilder(f"{builder.directory} does not build {command.component}")
        return command.component, _upload_component(builder, command, distributions)
    if command.kind == "Upload-template":
        return command.template, _upload_template(builder, command)
    if command.kind == "Build-template":
        return command.template, _build_template(builder, command)
    return f"iso-{command.version}", _build_iso(builder)
