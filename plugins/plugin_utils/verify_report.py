# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The post-installation checks of a deployed build infrastructure, decided in dom0.

Each qube's facts are what read-only commands printed in it (untrusted: bounded here, parsed,
never evaluated, and only ever turned into rows of that qube); what they must be comes from the
inventory. A row is (qube, check, ok, detail): for a failed check the detail says what was found
and how to fix it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ansible_collections.qubes_infra.build.plugins.module_utils.openpgp import listed_primaries

MAX_FACT = 65536  # characters of one fact a qube can make dom0 look at
MAX_SHOWN = 60  # characters of a qube's text shown in the table
CONF_VARIABLES = (
    "NO_SIGN",
    "SIGN_KEY",
    "DISTS_VM",
    "DIST_DOM0",
    "COMPONENTS",
    "LINUX_REPO_BASEDIR",
)
SET_WITH_DEFAULT = ("DISTS_VM", "DIST_DOM0", "COMPONENTS")  # builder-github overrides them
INCLUDE_GITHUB_CONF = re.compile(r"^-?include\s+\$[({]HOME[)}]/builder-github\.conf$")
UNREACHABLE_FIX = "not reachable: start it (qvm-start {qube}) or check the inventory"


@dataclass(frozen=True)
class Row:
    qube: str
    check: str
    ok: bool
    detail: str


def fact(facts: Mapping[str, Any], name: str) -> str:
    """One fact a qube gave, bounded; missing or not text counts as empty."""
    value = facts.get(name, "")
    return value[:MAX_FACT] if isinstance(value, str) else ""


def shown(text: str) -> str:
    """A qube's text as the table may show it: printable ASCII on one line, bounded."""
    flat = "".join(c if " " <= c <= "~" else "?" for c in text.strip())
    return flat if len(flat) <= MAX_SHOWN else flat[: MAX_SHOWN - 3] + "..."


def listed(values: Iterable[str]) -> str:
    return shown(", ".join(values)) or "none"


def check(qube: str, name: str, ok: bool, found: str, fix: str) -> Row:
    """A row that shows what was found when the check passed, and how to fix it when not."""
    return Row(qube, name, ok, found if ok else fix)


def mapping(facts: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = facts.get(name)
    return value if isinstance(value, dict) else {}


# -- keys qubes ------------------------------------------------------------------------------------
def signing_key(expect: Mapping[str, Any], exported: Mapping[str, str]) -> tuple[str, str]:
    """The key the environment signs with, and where that comes from."""
    named = str(expect.get("sign_key") or "").upper()
    if named:
        return named, f"build_infra_envs.{expect['env']}.sign_key"
    return exported.get(
        str(expect["keys_vm"]), ""
    ), f"the key exported to {expect['exported_file']}"


def keys_rows(
    qube: str, facts: Mapping[str, Any], expect: Mapping[str, Any], exported: Mapping[str, str]
) -> list[Row]:
    wanted, source = signing_key(expect, exported)
    held = listed_primaries(fact(facts, "secret_keys"))
    if not wanted:
        fix = (
            "the env names no sign_key and no public key was exported to"
            f" {expect['exported_file']}: set build_infra_envs.{expect['env']}.sign_key, or run"
            " the keys_vm role"
        )
    else:
        fix = (
            f"{wanted} ({source}) is not here (found {listed(held)}): give its secret key in"
            " keys_vm_secret_key and run the keys_vm role"
        )
    return [
        check(qube, "signing key", bool(wanted) and wanted in held, f"{wanted} ({source})", fix)
    ]


# -- build qubes -----------------------------------------------------------------------------------
def no_secret_key(qube: str, facts: Mapping[str, Any], allowed: str = "") -> Row:
    held = [key for key in listed_primaries(fact(facts, "secret_keys")) if key != allowed]
    return check(
        qube,
        "no other secret key",
        not held,
        f"only {allowed}" if allowed else "none",
        f"found {listed(held)}: delete them (gpg --delete-secret-keys FPR in {qube});"
        " signing keys live in the keys qubes only",
    )


def upload_key_row(qube: str, facts: Mapping[str, Any]) -> Row:
    mode = shown(fact(facts, "upload_key_mode"))
    valid = fact(facts, "upload_key_valid") == "0"
    found = "missing" if not mode else (f"mode {mode}" if valid else "not a private key")
    return check(
        qube,
        "upload ssh key",
        mode == "600" and valid,
        "~/.ssh/id_ed25519, mode 0600",
        f"~/.ssh/id_ed25519 {found}: give build_vm_upload_ssh_key (Ansible Vault) and run"
        " the build_vm role (it writes it 0600)",
    )


def ssh_user(settings: str) -> str:
    """The user `ssh -G` says ssh logs in as."""
    for line in settings.splitlines():
        keyword, space, value = line.partition(" ")
        if keyword == "user" and space:
            return value.strip()
    return ""


def host_keys(known: str) -> set[str]:
    """The key (type and blob) of each line `ssh-keygen -F` printed."""
    keys = set()
    for line in known.splitlines():
        fields = line.split()
        if len(fields) >= 3 and not line.startswith("#"):
            keys.add(f"{fields[1]} {fields[2]}")
    return keys


def remote_host_rows(qube: str, facts: Mapping[str, Any], hosts: Mapping[str, Any]) -> list[Row]:
    rows = []
    for host, settings in sorted(hosts.items()):
        wanted = str(settings.get("user") or "user")
        user = ssh_user(fact(mapping(facts, "ssh_settings"), host))
        rows.append(check(qube, f"ssh user {host}", user == wanted, wanted,
                          f"ssh logs in as {shown(user) or 'nobody'}, not {wanted}: run the"
                          " build_vm role (build_infra_remote_hosts)"))  # fmt: skip
        key = " ".join(str(settings.get("host_key", "")).split()[:2])
        known = host_keys(fact(mapping(facts, "known_hosts"), host))
        rows.append(check(qube, f"known_hosts {host}", key in known, shown(key),
                          f"~/.ssh/known_hosts lacks its host key {shown(key)}: run the build_vm"
                          f" role (build_infra_remote_hosts.{host}.host_key)"))  # fmt: skip
    return rows


def verified_tags(output: str) -> list[str]:
    """Tags whose `git verify-tag --raw` status, after a `TAG name` line, shows one good
    signature by a fully or ultimately trusted key (what qubes-builder's verify-git-tag wants)."""
    tags: dict[str, list[str]] = {}
    current = None
    for line in output.splitlines():
        if line.startswith("TAG "):
            current = line[4:]
            tags[current] = []
        elif current is not None and line.startswith("[GNUPG:] "):
            tags[current].append(line.split()[1] if len(line.split()) > 1 else "")
    return [
        tag
        for tag, status in tags.items()
        if status.count("NEWSIG") <= 1
        and "VALIDSIG" in status
        and "GOODSIG" in status
        and ("TRUST_FULLY" in status or "TRUST_ULTIMATE" in status)
    ]


def checkout_rows(qube: str, directory: str, facts: Mapping[str, Any], commit: str) -> list[Row]:
    head = fact(facts, "head").strip()
    at_pin = bool(commit) and head == commit
    tags = verified_tags(fact(facts, "tags"))
    return [
        check(qube, f"{directory} at pin", at_pin, commit,
              f"at {shown(head) or 'no commit'}, pinned {commit or 'nothing'}: move the checkout"
              " away and run the build_vm role (or pin build_vm_builder_commit)"),
        check(qube, f"{directory} signed tag", at_pin and bool(tags),
              f"{listed(tags)}, signature verified",
              "no tag on the pinned commit verifies with the build qube's trusted keys: pin a"
              " signed release tag's commit; trust its signer (build_vm_trusted_keys)"),
    ]  # fmt: skip


def makefile_lines(text: str) -> list[str]:
    """builder.conf's lines, continuations joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    return [line.split("#", 1)[0].strip() for line in joined.splitlines() if line.strip()]


def assignments(lines: list[str], name: str) -> list[str]:
    """The operators builder.conf assigns `name` with (`=`, `?=`, `:=`, ...)."""
    pattern = re.compile(rf"^(?:override\s+|export\s+)*{name}\s*([?:+!]*=)")
    return [match.group(1) for match in map(pattern.match, lines) if match]


def effective(output: str) -> dict[str, str]:
    """NAME=value lines make printed for the variables dom0 asks about (first one wins)."""
    values: dict[str, str] = {}
    for line in output.splitlines():
        name, sep, value = line.partition("=")
        if sep and name in CONF_VARIABLES and name not in values:
            values[name] = value.strip()
    return values


def conf_rows(qube: str, directory: str, facts: Mapping[str, Any], sign_key: str) -> list[Row]:
    conf = f"{directory}/builder.conf"
    output = fact(facts, "conf_values")
    if fact(facts, "conf_rc") != "0" or fact(facts, "conf_values_rc") != "0":
        return [Row(qube, conf, False,
                    f"cannot be read with make ({shown(output) or 'no such file'}): run the"
                    " build_vm role (it links it to builders[].config_file)")]  # fmt: skip
    lines, values = makefile_lines(fact(facts, "conf")), effective(output)

    def rule(name: str, ok: bool, found: str, fix: str) -> Row:
        return check(qube, f"builder.conf {name}", ok, found, f"{conf}: {fix}")

    no_sign, key = values.get("NO_SIGN", ""), values.get("SIGN_KEY", "").upper()
    rows = [
        rule("no NO_SIGN", not no_sign, "unset",
             f"NO_SIGN is {shown(no_sign)}: remove it, builds must be signed"),
        rule("SIGN_KEY", bool(sign_key) and key == sign_key, sign_key,
             f"SIGN_KEY is {shown(key) or 'unset'}, not {sign_key or 'known'}: run the build_vm"
             " role (SIGN_KEY in ~/builder-github.conf); release configurations must not set it"),
    ]  # fmt: skip
    for name in SET_WITH_DEFAULT:
        operators = assignments(lines, name)
        ok = bool(operators) and set(operators) <= {"?=", "+="} and bool(values.get(name))
        found = ", ".join(f"{name} {operator}" for operator in operators) or "unset"
        fix = f"{found}: set it with {name} ?= so builder-github can choose"
        rows.append(rule(f"{name} ?=", ok, shown(values.get(name, "")), fix))
    basedir = values.get("LINUX_REPO_BASEDIR", "")
    rows += [
        rule("builder-github", "builder-github" in values.get("COMPONENTS", "").split(),
             "in COMPONENTS", "add builder-github to COMPONENTS"),
        rule("LINUX_REPO_BASEDIR", bool(basedir), shown(basedir),
             "set LINUX_REPO_BASEDIR to the release's repository folder"),
        rule("includes builder-github.conf", any(map(INCLUDE_GITHUB_CONF.match, lines)), "yes",
             "add include $(HOME)/builder-github.conf"),
    ]  # fmt: skip
    return rows


def build_rows(
    qube: str, facts: Mapping[str, Any], expect: Mapping[str, Any], exported: Mapping[str, str]
) -> list[Row]:
    rows = [no_secret_key(qube, facts), upload_key_row(qube, facts)]
    rows += remote_host_rows(qube, facts, expect.get("remote_hosts") or {})
    sign_key = signing_key(expect, exported)[0]
    commit = str(expect.get("builder_commit") or "")
    for directory in expect.get("builders") or []:
        found = mapping(mapping(facts, "builders"), directory)
        rows += checkout_rows(qube, directory, found, commit)
        rows += conf_rows(qube, directory, found, sign_key)
    return rows


# -- logs qubes ------------------------------------------------------------------------------------
def set_aside_row(qube: str, facts: Mapping[str, Any]) -> Row:
    """Logs the logs repository refused, which the build_logs role keeps for an operator."""
    names = [name for name in fact(facts, "set_aside").splitlines() if name.strip()]
    first = shown(names[0]) if names else ""
    return check(qube, "set-aside logs", not names, "none",
                 f"{len(names)} refused by the logs repository, kept in .set-aside/ (first:"
                 f" {first}): see 'A set-aside log' in the build_logs role's README")  # fmt: skip


def logs_rows(qube: str, facts: Mapping[str, Any], expect: Mapping[str, Any]) -> list[Row]:
    key = str(expect.get("logs_key") or "").upper()
    public = bool(key) and key in listed_primaries(fact(facts, "public_keys"))
    trusted = f"{key}:6:" in fact(facts, "ownertrust").splitlines()
    secret = bool(key) and key in listed_primaries(fact(facts, "secret_keys"))
    mode = shown(fact(facts, "deploy_key_mode"))
    named = key or "build_logs_key_fingerprint unset"
    give = "give build_logs_public_key and build_logs_secret_key, run the build_logs role"
    return [
        check(qube, "logs key public, trusted", public and trusted, key,
              f"{named} {'not ultimately trusted' if public else 'missing'}: {give}"),
        check(qube, "logs key secret", secret, "present", f"{named} missing: {give}"),
        no_secret_key(qube, facts, allowed=key),
        check(qube, "deploy key", mode == "600", "~/.ssh/build-logs-deploy-key, mode 0600",
              f"~/.ssh/build-logs-deploy-key {f'mode {mode}' if mode else 'missing'}: give"
              " build_logs_deploy_key and run the build_logs role (it writes it 0600)"),
        set_aside_row(qube, facts),
    ]  # fmt: skip


# -- dom0 ------------------------------------------------------------------------------------------
def human(size: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size} bytes"


def volume_rows(volumes: Iterable[Mapping[str, Any]]) -> list[Row]:
    rows = []
    for volume in volumes:
        qube, wanted = str(volume["qube"]), int(volume["wanted"])
        said = str(volume.get("size", "")).strip()
        size = int(said) if said.isdigit() else -1
        found = human(size) if size >= 0 else "unknown"
        rows.append(check("dom0", f"private volume {qube}", size >= wanted, found,
                          f"{found}, want {human(wanted)}: run the dom0 role (qvm-volume extend"
                          f" {qube}:private {human(wanted)})"))  # fmt: skip
    return rows


def flows_row(flows: Mapping[str, Any]) -> Row:
    """The qrexec_flows module's result: the first wrong flow, or why none could be checked."""
    checked, wrong = flows.get("checked"), flows.get("wrong")
    passed = isinstance(checked, int) and wrong is None
    if passed:
        message = f"all {checked} flows as expected"
    else:
        message = str(wrong or flows.get("msg") or "the check returned nothing")
    return check("dom0", "policy flow matrix", passed, message,
                 f"{message}: run the dom0 role, and remove rules of other files in"
                 " /etc/qubes/policy.d that come before its own")  # fmt: skip


# -- the report ------------------------------------------------------------------------------------
def qube_rows(entry: Mapping[str, Any], exported: Mapping[str, str]) -> list[Row]:
    qube, kind, expect = str(entry["qube"]), entry["kind"], entry["expect"]
    facts = entry.get("facts")
    if not isinstance(facts, dict):
        return [Row(qube, "reachable", False, UNREACHABLE_FIX.format(qube=qube))]
    if kind == "keys":
        return keys_rows(qube, facts, expect, exported)
    if kind == "build":
        return build_rows(qube, facts, expect, exported)
    return logs_rows(qube, facts, expect)


def table(rows: list[Row]) -> list[str]:
    """The rows as fixed-width lines under a heading."""
    heading = Row("QUBE", "CHECK", True, "DETAIL / HOW TO FIX")
    width_qube = max(len(row.qube) for row in [heading, *rows])
    width_check = max(len(row.check) for row in [heading, *rows])

    def line(row: Row, result: str) -> str:
        return f"{row.qube:<{width_qube}}  {row.check:<{width_check}}  {result:<4}  {row.detail}"

    return [line(heading, "    "), *(line(row, "ok" if row.ok else "FAIL") for row in rows)]


def report(
    entries: Iterable[Mapping[str, Any]],
    exported: Mapping[str, str],
    volumes: Iterable[Mapping[str, Any]],
    flows: Mapping[str, Any] | None,
) -> dict[str, Any]:
    rows = [row for entry in entries for row in qube_rows(entry, exported)]
    rows += volume_rows(volumes)
    if flows:
        rows.append(flows_row(flows))
    failed = sum(not row.ok for row in rows)
    return {"lines": table(rows) if rows else [], "failed": failed, "checks": len(rows)}
