"""The Qubes release a simulated host is. A host is one release for its whole life: whatever
differs between Qubes 4.2 and 4.3 (the templates' files, dom0's default policy, the dom0 tools)
follows the release stored with it."""

from __future__ import annotations

from collections.abc import Mapping

from qubesim.errors import QubesimError

RELEASES = ("4.2", "4.3")
# The current stable release, made when nothing else is asked for.
CURRENT = "4.3"
VARIABLE = "QUBESIM_RELEASE"
# A host made before qubesim stored its release was made as 4.3 (its templates forced root for
# qubes.VMRootShell), so it keeps that release.
UNRECORDED = "4.3"


class ReleaseMismatch(QubesimError):
    pass


def requested(option: str | None, environment: Mapping[str, str]) -> str | None:
    """The release `qubesim init` is asked for: --release, else $QUBESIM_RELEASE; None when
    neither says (a new host is then CURRENT, an existing one keeps its own)."""
    wanted = option or environment.get(VARIABLE) or None
    if wanted is not None and wanted not in RELEASES:
        origin = "--release" if option else VARIABLE
        raise QubesimError(
            f"{origin}: Qubes release {wanted!r} is not simulated (one of {', '.join(RELEASES)})"
        )
    return wanted


def stored(data: Mapping[str, object]) -> str:
    """The release recorded in a host's database content."""
    value = data.get("release")
    return value if isinstance(value, str) and value in RELEASES else UNRECORDED


def chosen(home: str, existing: str | None, wanted: str | None) -> str:
    """The release of the host at `home` after `qubesim init`: a new host is the one asked for
    (or CURRENT); an existing one keeps its own, and asking for another is refused, saying how to
    start over."""
    if existing is None:
        return wanted or CURRENT
    if wanted is not None and wanted != existing:
        raise ReleaseMismatch(
            f"the simulated host at {home} is Qubes {existing}, not {wanted}; to make a"
            f" {wanted} host here, remove this one first with 'qubesim destroy' (with"
            f" QUBESIM_HOME={home}), or choose another QUBESIM_HOME"
        )
    return existing


def since(release: str, first: str) -> bool:
    """Whether `release` has what came with release `first`."""
    return _key(release) >= _key(first)


def _key(release: str) -> tuple[int, ...]:
    return tuple(int(part) for part in release.split("."))
