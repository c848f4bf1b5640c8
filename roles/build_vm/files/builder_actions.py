# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""What a builder runs for a build or an accepted command, as builder-github has it run.

qubes-builder (builders.list format 1) is driven by its scripts, as qubes-builder-github does:
`scripts/auto-build COMPONENT`, `scripts/make-with-log update-repo-REPOSITORY` (first making the
repository, then uploading it) and `scripts/auto-build-template`. qubes-builderv2 (format 2) by
its `qb` command with the builder's configuration, the stages qubes-builderv2-github runs.

An upload is bound to what was built: the component's checked-out sources must be at the signed
commit (qubes-builder: DIR/qubes-src/COMPONENT; qubes-builderv2: DIR/artifacts/sources/COMPONENT),
and a template's built version and timestamp must be the signed ones.
"""

from __future__ import annotations

import os
import subprocess

from builder_instances import Builder, Step, find_component
from command_grammar import Command

MAKE_WITH_LOG = "scripts/make-with-log"


class NotForThisBuilder(Exception):
    """This builder does not take the command (another one may); the text says why."""


def build_steps(builder: Builder, version: int, component: str) -> list[Step]:
    """A component's whole build (TriggerBuild)."""
    if version == 2:
        return [Step((*builder.base_command(), "-c", component, "package", "all"))]
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


def _require_commit(builder: Builder, version: int, command: Command) -> None:
    sources = "artifacts/sources" if version == 2 else "qubes-src"
    directory = os.path.join(builder.directory, sources, command.component)
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
    builder: Builder, version: int, command: Command, distributions: tuple[str, ...] | None
) -> list[Step]:
    _require_commit(builder, version, command)
    if version == 2:
        selection = ["-c", command.component]
        for name in distributions or ():
            selection += ["-d", name]
        base = (*builder.base_command(), *selection, "repository")
        return [
            Step((*base, "publish", command.repository)),
            Step((*base, "upload", command.repository)),
        ]
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


def _upload_template(builder: Builder, version: int, command: Command) -> list[Step]:
    if version == 2:
        base = (*builder.base_command(), "-t", command.template, "repository")
        return [
            Step((*base, "publish", command.repository)),
            Step((*base, "upload", command.repository)),
        ]
    built = _built_template_version(builder, command.template)
    if built != command.version:
        raise NotForThisBuilder(
            f"template {command.template} in {builder.directory} is {built or 'not built'},"
            f" not the signed {command.version}"
        )
    variables = {"COMPONENTS": "linux-template-builder", "DISTS_VM": command.template}
    return _make_repository_steps(builder, command.repository, variables)


def _build_template(builder: Builder, version: int, command: Command) -> list[Step]:
    if version == 2:
        stages = (
            "template",
            "prep",
            "--template-timestamp",
            command.timestamp,
            "build",
            "sign",
            "publish",
            "upload",
        )
        return [Step((*builder.base_command(), "-t", command.template, *stages))]
    script = os.path.join(builder.directory, "scripts/auto-build-template")
    return [Step((script, command.template, command.timestamp))]


def _build_iso(builder: Builder, version: int, command: Command) -> list[Step]:
    if version != 2:
        raise NotForThisBuilder(f"qubes-builder in {builder.directory} does not build ISOs")
    stages = (
        "installer",
        "init-cache",
        "prep",
        "--iso-timestamp",
        command.timestamp,
        "build",
        "sign",
        "upload",
    )
    return [Step((*builder.base_command(), "-o", f"iso:version={command.version}", *stages))]


def command_steps(
    builder: Builder,
    version: int,
    command: Command,
    distributions: tuple[str, ...] | None,
    timeout: float,
) -> tuple[str, list[Step]]:
    """What `builder` runs for an accepted command, and the name its log is kept under;
    NotForThisBuilder when it does not take it."""
    if "r" + builder.release != command.release:
        raise NotForThisBuilder(f"{builder.directory} builds release r{builder.release}")
    if command.kind == "Upload-component":
        if find_component(builder, version, command.component, timeout) != command.component:
            raise NotForThisBuilder(f"{builder.directory} does not build {command.component}")
        return command.component, _upload_component(builder, version, command, distributions)
    if command.kind == "Upload-template":
        return command.template, _upload_template(builder, version, command)
    if command.kind == "Build-template":
        return command.template, _build_template(builder, version, command)
    return f"iso-{command.version}", _build_iso(builder, version, command)
