# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Qubes qrexec policy: parsing (v5 files, directives, legacy R4.0 files) and evaluation.

One implementation with Qubes' semantics, used by the collection's dom0 modules, by the verify
playbook and by qubesim's qrexec. Standard library only; no Ansible import.

The policy is the rules of every file, in order; the first rule that matches a call decides, and a
call that no rule matches is denied. A syntax error anywhere makes the whole policy fail, and then
every call is denied.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

POLICY_DIRECTORIES = ("/run/qubes/policy.d", "/etc/qubes/policy.d")
LEGACY_DIRECTORY = "/etc/qubes-rpc/policy"
ADMIN_VM = "dom0"

_SERVICE = re.compile(r"[A-Za-z0-9._-]+\Z")
_ARGUMENT = re.compile(r"\+[A-Za-z0-9._+-]*\Z")
_NAME = re.compile(r"[A-Za-z0-9_.-]+\Z")
_FILE_NAME = re.compile(r"[0-9a-z_.-]+\Z")
ACTIONS = ("allow", "deny", "ask")
_PARAMETERS = {
    "allow": ("target", "user", "notify", "autostart"),
    "ask": ("target", "user", "notify", "autostart", "default_target"),
    "deny": ("notify",),
}
_BOOLEAN_PARAMETERS = ("notify", "autostart")


class PolicySyntaxError(Exception):
    """A policy that cannot be loaded: str() is `FILE:LINE: message`."""

    def __init__(self, file: str, line: int, message: str) -> None:
        super().__init__(f"{file}:{line}: {message}")
        self.file = file
        self.line = line
        self.message = message


# -- what the policy is about ----------------------------------------------------------------------
@dataclass(frozen=True)
class Qube:
    name: str
    klass: str  # AppVM, TemplateVM, DispVM, StandaloneVM, AdminVM
    tags: frozenset[str] = frozenset()
    default_dispvm: str | None = None
    template_for_dispvms: bool = False
    running: bool = True
    uuid: str | None = None


class System:
    """The qubes a decision is about, found by name or by `uuid:U`."""

    def __init__(self, qubes: Iterable[Qube]) -> None:
        self.qubes = {qube.name: qube for qube in qubes}
        self.by_uuid = {qube.uuid: qube for qube in self.qubes.values() if qube.uuid}

    def get(self, reference: str) -> Qube | None:
        if reference.startswith("uuid:"):
            return self.by_uuid.get(reference[len("uuid:") :])
        return self.qubes.get(reference)


@dataclass(frozen=True)
class Request:
    source: str
    target: str  # as the caller asked
    service: str
    argument: str = ""  # without the leading '+'


# -- tokens ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Token:
    """A source, target or redirect value of a rule: `kind` with an optional value."""

    kind: str  # name, uuid, any, anyvm, adminvm, default, tag, type, dispvm, dispvm_for, dispvm_tag
    value: str = ""

    def __str__(self) -> str:
        return {
            "name": self.value,
            "uuid": f"uuid:{self.value}",
            "any": "*",
            "anyvm": "@anyvm",
            "adminvm": "@adminvm",
            "default": "@default",
            "tag": f"@tag:{self.value}",
            "type": f"@type:{self.value}",
            "dispvm": "@dispvm",
            "dispvm_for": f"@dispvm:{self.value}",
            "dispvm_tag": f"@dispvm:@tag:{self.value}",
        }[self.kind]


# Where each kind of token may stand (the reference's token table).
_SOURCE_KINDS = {
    "name",
    "uuid",
    "any",
    "anyvm",
    "adminvm",
    "tag",
    "type",
    "dispvm_for",
    "dispvm_tag",
}
_TARGET_KINDS = _SOURCE_KINDS | {"default", "dispvm"}
_REDIRECT_KINDS = {"name", "uuid", "adminvm", "dispvm", "dispvm_for"}


def _parse_token(text: str) -> Token:
    """A token of any column; ValueError names what is wrong."""
    simple = {
        "*": "any",
        "@anyvm": "anyvm",
        "@adminvm": "adminvm",
        "dom0": "adminvm",
        "@default": "default",
        "@dispvm": "dispvm",
    }
    if text in simple:
        return Token(simple[text])
    for prefix, kind in (
        ("@dispvm:@tag:", "dispvm_tag"),
        ("@tag:", "tag"),
        ("@type:", "type"),
        ("@dispvm:", "dispvm_for"),
        ("uuid:", "uuid"),
    ):
        if text.startswith(prefix):
            value = text[len(prefix) :]
            if not value:
                raise ValueError(f"empty {prefix!r} token")
            if not _NAME.match(value) and prefix != "uuid:":
                raise ValueError(f"invalid token {text!r}")
            return Token(kind, value)
    if text.startswith("@") or not _NAME.match(text):
        raise ValueError(f"invalid token {text!r}")
    return Token("name", text)


def _column_token(text: str, kinds: set[str], column: str) -> Token:
    try:
        token = _parse_token(text)
    except ValueError as error:
        raise ValueError(f"invalid {column}: {error}") from None
    if token.kind not in kinds:
        raise ValueError(f"invalid {column} token {text!r}")
    return token


# -- rules -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    service: str  # or '*'
    argument: str  # '*', or '+ARG' ('+' alone: the empty argument)
    source: Token
    target: Token
    action: str
    params: dict[str, str] = field(default_factory=dict)
    file: str = ""
    line: int = 0

    @property
    def location(self) -> str:
        return f"{self.file}:{self.line}"

    def flag(self, name: str, default: bool) -> bool:
        value = self.params.get(name)
        return default if value is None else value == "yes"

    def redirect(self) -> Token | None:
        value = self.params.get("target")
        return _parse_token(value) if value else None


def _parse_params(action: str, words: list[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for word in words:
        key, separator, value = word.partition("=")
        if not separator:
            raise ValueError(f"invalid parameter {word!r}: expected KEY=VALUE")
        if key in params:
            raise ValueError(f"parameter {key!r} given twice")
        if key not in _PARAMETERS[action]:
            raise ValueError(f"parameter {key!r} is not valid for action {action!r}")
        if key in _BOOLEAN_PARAMETERS and value not in ("yes", "no"):
            raise ValueError(f"{key}= must be yes or no, not {value!r}")
        if key in ("target", "default_target"):
            if not value:
                raise ValueError(f"empty {key}=")
            _column_token(value, _REDIRECT_KINDS, f"{key}=")
        params[key] = value
    return params


def _parse_rule(
    service: str, argument: str, source: str, target: str, action: str, params: list[str]
) -> Rule:
    if service != "*" and not _SERVICE.match(service):
        raise ValueError(f"invalid service {service!r}")
    if argument != "*":
        if not argument.startswith("+"):
            raise ValueError(f"invalid argument {argument!r}: must be '*' or start with '+'")
        if not _ARGUMENT.match(argument):
            raise ValueError(f"invalid argument {argument!r}")
    if service == "*" and argument != "*":
        raise ValueError("a '*' service only takes a '*' argument")
    if action not in ACTIONS:
        raise ValueError(f"invalid action {action!r}")
    source_token = _column_token(source, _SOURCE_KINDS, "source")
    target_token = _column_token(target, _TARGET_KINDS, "target")
    parsed = _parse_params(action, params)
    if action == "allow" and target_token.kind == "default" and "target" not in parsed:
        raise ValueError("allow with a @default target needs target=")
    return Rule(service, argument, source_token, target_token, action, parsed)


def _at(rule: Rule, file: str, line: int) -> Rule:
    return Rule(
        rule.service, rule.argument, rule.source, rule.target, rule.action, rule.params, file, line
    )


def _resolve(path: str, base: str) -> str:
    return path if os.path.isabs(path) else os.path.join(base, path)


def _policy_files(directory: str) -> list[str]:
    """The valid policy files of a directory, sorted by name (codepoint order)."""
    names = sorted(
        name
        for name in os.listdir(directory)
        if name.endswith(".policy")
        and not name.startswith(".")
        and os.path.isfile(os.path.join(directory, name))
    )
    for name in names:
        if not _FILE_NAME.match(name):
            raise PolicySyntaxError(os.path.join(directory, name), 0, "invalid policy file name")
    return [os.path.join(directory, name) for name in names]


class _Parser:
    """Reads v5 files (following directives) and legacy files into one list of rules."""

    def __init__(self, base: str, legacy_directory: str) -> None:
        self.base = base
        self.legacy_directory = legacy_directory
        self.rules: list[Rule] = []
        self.errors: list[PolicySyntaxError] = []
        self._including: list[str] = []

    def file(self, path: str) -> None:
        if path in self._including:
            self.errors.append(PolicySyntaxError(path, 0, "recursive !include"))
            return
        try:
            with open(path, encoding="utf-8") as source:
                text = source.read()
        except (OSError, UnicodeDecodeError) as error:
            self.errors.append(PolicySyntaxError(path, 0, f"cannot read: {error}"))
            return
        self._including.append(path)
        self.text(text, path)
        self._including.pop()

    def text(self, text: str, path: str) -> None:
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            try:
                self._line(line.split(), path, number)
            except ValueError as error:
                self.errors.append(PolicySyntaxError(path, number, str(error)))

    def _line(self, words: list[str], path: str, number: int) -> None:
        if words[0].startswith("!"):
            self._directive(words, path)
            return
        if len(words) < 5:
            raise ValueError(f"wrong number of fields: {len(words)} (at least 5)")
        rule = _parse_rule(words[0], words[1], words[2], words[3], words[4], words[5:])
        self.rules.append(_at(rule, path, number))

    def _directive(self, words: list[str], path: str) -> None:
        directory = os.path.dirname(path) if os.path.isabs(path) else self.base
        name, arguments = words[0], words[1:]
        expected = {"!include": 1, "!include-dir": 1, "!include-service": 3, "!compat-4.0": 0}
        if name not in expected:
            raise ValueError(f"unknown directive {name!r}")
        if len(arguments) != expected[name]:
            raise ValueError(f"{name} takes {expected[name]} argument(s)")
        if name == "!include":
            self.file(_resolve(arguments[0], directory))
        elif name == "!include-dir":
            try:
                for included in _policy_files(_resolve(arguments[0], directory)):
                    self.file(included)
            except OSError as error:
                raise ValueError(f"cannot read directory: {error}") from None
        elif name == "!include-service":
            service, argument, legacy = arguments
            if argument != "*" and not argument.startswith("+"):
                raise ValueError(f"invalid argument {argument!r}")
            self.legacy_file(_resolve(legacy, directory), service, argument, implicit_denies=False)
        else:
            self.compat()

    def legacy_file(self, path: str, service: str, argument: str, implicit_denies: bool) -> None:
        """An R4.0 file (`SOURCE TARGET ACTION[,k=v...]`, `$` for `@`) for one service."""
        try:
            with open(path, encoding="utf-8") as source:
                lines = source.read().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            self.errors.append(PolicySyntaxError(path, 0, f"cannot read: {error}"))
            return
        for number, raw in enumerate(lines, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            words = line.replace("$", "@").replace(",", " ").split()
            try:
                if len(words) < 3:
                    raise ValueError(f"wrong number of fields: {len(words)} (at least 3)")
                rule = _parse_rule(service, argument, words[0], words[1], words[2], words[3:])
                self.rules.append(_at(rule, path, number))
            except ValueError as error:
                self.errors.append(PolicySyntaxError(path, number, str(error)))
        if implicit_denies:
            for target in ("@anyvm", "@adminvm"):
                rule = _parse_rule(service, argument, "@anyvm", target, "deny", [])
                self.rules.append(_at(rule, path, len(lines) + 1))

    def compat(self) -> None:
        """!compat-4.0: every legacy file, per service the argument-specific ones first."""
        try:
            names = sorted(os.listdir(self.legacy_directory))
        except OSError:
            return
        services: dict[str, list[str]] = {}
        for name in names:
            path = os.path.join(self.legacy_directory, name)
            if not name.startswith(".") and os.path.isfile(path):
                services.setdefault(name.partition("+")[0], []).append(name)
        for service in sorted(services):
            files = sorted(services[service], key=lambda name: ("+" not in name, name))
            for name in files:
                plus, argument = name.partition("+")[1:]
                # Each argument file ends with implicit denies; the generic file adds nothing.
                self.legacy_file(
                    os.path.join(self.legacy_directory, name),
                    service,
                    f"+{argument}" if plus else "*",
                    implicit_denies=bool(plus),
                )


# -- decisions -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    allowed: bool
    target: str | None  # the final target: a qube, or @dispvm:V for a new disposable
    user: str | None
    autostart: bool
    notify: bool
    rule: Rule | None
    reason: str
    requested_target_type: str = "name"  # or "keyword" (@default, @dispvm, @adminvm)

    @property
    def rule_location(self) -> str:
        return self.rule.location if self.rule else ""


def _deny(reason: str, rule: Rule | None = None, target_type: str = "name") -> Decision:
    notify = rule.flag("notify", True) if rule else True
    return Decision(False, None, None, False, notify, rule, reason, target_type)


def _normalise_target(requested: str, source: Qube, system: System) -> str | None:
    """What the caller's target means: a qube name, @adminvm, @default or @dispvm[:V]; None when
    such a request is refused outright."""
    if requested in ("dom0", "@adminvm"):
        return "@adminvm"
    if requested in ("@anyvm", "*") or requested.startswith(("@tag:", "@type:")):
        return None
    if requested == "@dispvm":
        return requested
    if requested.startswith("@dispvm:"):
        template = system.get(requested[len("@dispvm:") :])
        return f"@dispvm:{template.name}" if template and template.template_for_dispvms else None
    if requested == "@default" or not requested:
        return "@default"
    qube = system.get(requested)
    if qube is None:
        return "@default"
    return "@adminvm" if qube.klass == "AdminVM" else qube.name


def _qube_matches(token: Token, qube: Qube) -> bool:
    """A token that names qubes (by name, uuid, tag or type) against one qube."""
    kind = token.kind
    if kind == "name":
        return qube.name == token.value
    if kind == "uuid":
        return qube.uuid == token.value
    if kind == "tag":
        return token.value in qube.tags
    return kind == "type" and qube.klass == token.value


def _source_matches(token: Token, source: Qube) -> bool:
    kind = token.kind
    if kind == "any":
        return True
    if kind == "anyvm":
        return source.klass != "AdminVM"
    if kind == "adminvm":
        return source.klass == "AdminVM"
    return _qube_matches(token, source)  # @dispvm:... never matches a source


def _target_matches(token: Token, target: str, source: Qube, system: System) -> bool:
    kind = token.kind
    if kind == "any":
        return True
    if kind == "anyvm":
        return target != "@adminvm"
    if kind == "adminvm":
        return target == "@adminvm"
    if kind in ("default", "dispvm"):
        return target == str(token)
    if kind == "dispvm_for":
        wanted = f"@dispvm:{token.value}"
        return target == wanted or (target == "@dispvm" and source.default_dispvm == token.value)
    if kind == "dispvm_tag":
        template = system.get(target[len("@dispvm:") :]) if target.startswith("@dispvm:") else None
        return template is not None and token.value in template.tags
    qube = None if target.startswith("@") else system.get(target)
    return qube is not None and _qube_matches(token, qube)


def _final_target(rule: Rule, target: str, source: Qube, system: System) -> tuple[str | None, str]:
    """The qube (or @dispvm:V) an allow rule sends the call to, or None and why not."""
    redirect = rule.redirect()
    final = str(redirect) if redirect else target
    if final == "@default":
        return None, "the call resolves to @default and the rule names no target="
    if final == "@dispvm":
        if not source.default_dispvm:
            return None, f"{source.name} has no default_dispvm for @dispvm"
        return f"@dispvm:{source.default_dispvm}", ""
    if final.startswith("@dispvm:"):
        return final, ""
    if final in ("@adminvm", ADMIN_VM):
        return ADMIN_VM, ""
    qube = system.get(final)
    if qube is None:
        return None, f"the target {final!r} does not exist"
    return qube.name, ""


class Policy:
    def __init__(self, rules: list[Rule]) -> None:
        self._rules = rules

    @property
    def rules(self) -> list[Rule]:
        return list(self._rules)

    @classmethod
    def load(
        cls,
        policy_dirs: Iterable[str] = POLICY_DIRECTORIES,
        legacy_dir: str = LEGACY_DIRECTORY,
        replacing: dict[str, str | None] | None = None,
    ) -> Policy:
        """The installed policy; PolicySyntaxError for the first error (then all calls fail).

        `replacing` maps paths of policy files to the text they would have (a file to be written
        is checked with the whole policy before it is installed); None as text removes the file.
        """
        replacing = replacing or {}
        chosen: dict[str, str] = {}
        for directory in policy_dirs:  # the first directory overrides files of the same name
            if os.path.isdir(directory):
                for path in _policy_files(directory):
                    chosen.setdefault(os.path.basename(path), path)
        for path, text in replacing.items():
            name = os.path.basename(path)
            if text is None:
                chosen.pop(name, None)
            elif name not in chosen or chosen[name] == path:
                chosen[name] = path
        parser = _Parser(os.getcwd(), legacy_dir)
        for name in sorted(chosen):
            path = chosen[name]
            if replacing.get(path) is not None:
                parser.text(replacing[path], path)
            else:
                parser.file(path)
        if parser.errors:
            raise parser.errors[0]
        return cls(parser.rules)

    @classmethod
    def from_text(
        cls, text: str, filename: str = "<text>", legacy_dir: str = LEGACY_DIRECTORY
    ) -> Policy:
        """One v5 file's content; relative !include paths resolve against the working directory."""
        parser = _Parser(os.getcwd(), legacy_dir)
        parser.text(text, filename)
        if parser.errors:
            raise parser.errors[0]
        return cls(parser.rules)

    def evaluate(self, request: Request, system: System) -> Decision:
        source = system.get(request.source)
        if source is None:
            return _deny(f"unknown source {request.source!r}")
        target = _normalise_target(request.target, source, system)
        # As asked: `dom0` is a name, `@adminvm` a keyword (dom0 services see the difference).
        target_type = "keyword" if request.target.startswith("@") or not request.target else "name"
        if target is None:
            return _deny(f"a call to {request.target!r} is not allowed", None, target_type)
        argument = f"+{request.argument}"
        for rule in self._rules:
            if (
                rule.service in ("*", request.service)
                and rule.argument in ("*", argument)
                and _source_matches(rule.source, source)
                and _target_matches(rule.target, target, source, system)
            ):
                return self._apply(rule, target, source, system, target_type)
        return _deny("no matching rule found", None, target_type)

    @staticmethod
    def _apply(rule: Rule, target: str, source: Qube, system: System, target_type: str) -> Decision:
        if rule.action == "deny":
            return _deny(f"denied by policy {rule.location}", rule, target_type)
        if rule.action == "ask":
            return _deny(f"ask action refused: no user to ask ({rule.location})", rule, target_type)
        final, problem = _final_target(rule, target, source, system)
        if final is None:
            return _deny(f"{problem} ({rule.location})", rule, target_type)
        if final == source.name:
            return _deny(f"a qube cannot call itself ({rule.location})", rule, target_type)
        autostart = rule.flag("autostart", True)
        qube = system.get(final)
        if qube is not None and not autostart and not qube.running and qube.klass != "AdminVM":
            return _deny(
                f"{final} is not running and autostart=no ({rule.location})", rule, target_type
            )
        return Decision(
            True,
            final,
            rule.params.get("user"),
            autostart,
            rule.flag("notify", False),
            rule,
            f"allowed by policy {rule.location}",
            target_type,
        )


def lint(paths: Iterable[str], legacy_dir: str = LEGACY_DIRECTORY) -> list[PolicySyntaxError]:
    """Every syntax error of each file, each file checked on its own (qubes-policy-lint)."""
    errors: list[PolicySyntaxError] = []
    for path in paths:
        name = os.path.basename(path)
        if name.endswith(".policy") and not _FILE_NAME.match(name):
            errors.append(PolicySyntaxError(path, 0, "invalid policy file name"))
            continue
        parser = _Parser(os.path.dirname(os.path.abspath(path)), legacy_dir)
        parser.file(path)
        errors.extend(parser.errors)
    return errors
