# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Qubes qrexec policy (qubes-core-qrexec 4.x semantics): loading and evaluation.

One implementation, used by the collection's dom0 modules, by the verify playbook and by qubesim's
qrexec. Standard library only and no Ansible import, so that all of them can load it; Python 3.8
syntax, since dom0 modules run with dom0's Python.

The policy is the rules of every file in order: `/run/qubes/policy.d` and `/etc/qubes/policy.d`
(a same-named file in the first wins), sorted by file name, with `!include`, `!include-dir`,
`!include-service` and `!compat-4.0` (the R4.0 files of `/etc/qubes-rpc/policy`) expanded where
they stand. The first rule that matches a call decides; no match denies. A syntax error anywhere,
or a policy file with an invalid name, makes the whole policy fail: `Policy.load` raises
`PolicySyntaxError`, and a caller must then deny every call, as Qubes does.

Deliberate differences from a real dom0, all on the lenient side of loading, never of deciding:
a policy or legacy directory that does not exist counts as empty (a test or a simulated host need
not create all of them), and an `ask` is always refused, since no person is there to answer.
"""

# Ansible's module_utils boilerplate: no-ops on Python 3, hence the noqa for ruff (pyupgrade).
from __future__ import absolute_import, annotations, division, print_function  # noqa: UP010

__metaclass__ = type  # noqa: UP001

import functools
import os
import re
import string
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

POLICY_DIRECTORIES = ("/run/qubes/policy.d", "/etc/qubes/policy.d")
LEGACY_DIRECTORY = "/etc/qubes-rpc/policy"
ADMIN_VM = "dom0"
ADMIN_VM_UUID = "00000000-0000-0000-0000-000000000000"
ACTIONS = ("allow", "deny", "ask")

# Characters of service names and arguments (a service name has no '+'), and of policy file names.
_RPC_CHARACTERS = frozenset(string.ascii_letters + string.digits + "+-._")
_FILE_NAME_CHARACTERS = frozenset(string.ascii_lowercase + string.digits + "_.-")
_POLICY_SUFFIX = ".policy"
# Leftovers of package updates and editors in the legacy directory, which !compat-4.0 skips.
_LEGACY_IGNORED_SUFFIXES = (".rpmsave", ".rpmnew", ".swp")

_PARAMETERS = {
    "allow": ("target", "user", "notify", "autostart"),
    "ask": ("target", "default_target", "user", "notify", "autostart"),
    "deny": ("notify",),
}
_FLAGS = ("notify", "autostart")
_REDIRECTS = ("target", "default_target")
_DIRECTIVES = {"!include": 1, "!include-dir": 1, "!include-service": 3, "!compat-4.0": 0}


class PolicySyntaxError(Exception):
    """A policy that cannot be loaded; str() is `FILE:LINE: message` (LINE 0: the whole file)."""

    def __init__(self, file: str, line: int, message: str) -> None:
        super().__init__(f"{file}:{line}: {message}")
        self.file = file
        self.line = line
        self.message = message


# -- the system a decision is about ---------------------------------------------------------------
@dataclass(frozen=True)
class Qube:
    name: str
    klass: str  # AppVM, TemplateVM, DispVM, StandaloneVM or AdminVM
    tags: frozenset[str] = frozenset()
    default_dispvm: str | None = None
    template_for_dispvms: bool = False
    running: bool = True
    uuid: str | None = None


class System:
    """The qubes, found by name or by `uuid:U`. dom0 is the one AdminVM; its uuid is all zeros
    unless told otherwise, as in Qubes."""

    def __init__(self, qubes: Iterable[Qube]) -> None:
        self._by_name: dict[str, Qube] = {}
        for qube in qubes:
            if qube.name in self._by_name:
                raise ValueError(f"two qubes are called {qube.name!r}")
            if (qube.name == ADMIN_VM) != (qube.klass == "AdminVM"):
                raise ValueError(f"the AdminVM must be the qube called {ADMIN_VM}: {qube}")
            self._by_name[qube.name] = qube
        if ADMIN_VM not in self._by_name:
            raise ValueError(f"a system has an AdminVM called {ADMIN_VM}")
        self._by_uuid = {q.uuid: q for q in self._by_name.values() if q.uuid}
        self._by_uuid.setdefault(ADMIN_VM_UUID, self._by_name[ADMIN_VM])

    def get(self, reference: str) -> Qube | None:
        if reference.startswith("uuid:"):
            return self._by_uuid.get(reference[len("uuid:") :])
        return self._by_name.get(reference)

    def __iter__(self) -> Iterator[Qube]:
        return iter(self._by_name.values())


@dataclass(frozen=True)
class Request:
    source: str
    target: str  # what the caller asked for, as given
    service: str
    argument: str = ""  # without the leading '+'


# -- tokens ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Token:
    """What a source, target or redirect value means: a kind, with a value for some kinds."""

    kind: str  # name, uuid, any, anyvm, adminvm, default, dispvm, dispvm_for, dispvm_tag, tag, type
    value: str = ""


_KEYWORDS = {
    "*": "any",
    "@anyvm": "anyvm",
    "@adminvm": "adminvm",
    "@default": "default",
    "@dispvm": "dispvm",
}
# Longest first: "@dispvm:@tag:T" is a token of its own, not "@dispvm:" with a value "@tag:T".
_PREFIXES = (
    ("@dispvm:@tag:", "dispvm_tag"),
    ("@dispvm:", "dispvm_for"),
    ("@tag:", "tag"),
    ("@type:", "type"),
)
# dom0 by name or by uuid means the same as @adminvm wherever it stands.
_ADMIN_VM_NAMES = (ADMIN_VM, f"uuid:{ADMIN_VM_UUID}")
_SOURCE_KINDS = frozenset(
    ("name", "uuid", "any", "anyvm", "adminvm", "tag", "type", "dispvm_for", "dispvm_tag")
)
_COLUMN_KINDS = {
    "source": _SOURCE_KINDS,
    "target": _SOURCE_KINDS | {"default", "dispvm"},
    "target=": frozenset(("name", "uuid", "adminvm", "dispvm", "dispvm_for")),
    "default_target=": frozenset(("name", "uuid", "adminvm", "dispvm", "dispvm_for")),
}


@functools.lru_cache(maxsize=4096)
def _token(text: str) -> _Token:
    """The meaning of a token in any column; ValueError when it has none. Anything that does not
    start with '@' names a qube (Qubes does not check the name: an unknown one never matches)."""
    if text in _KEYWORDS:
        return _Token(_KEYWORDS[text])
    if text in _ADMIN_VM_NAMES:
        return _Token("adminvm")
    if not text.startswith("@"):
        if text.startswith("uuid:"):
            return _Token("uuid", text[len("uuid:") :])
        return _Token("name", text)
    for prefix, kind in _PREFIXES:
        if text.startswith(prefix):
            value = text[len(prefix) :]
            if not value:
                raise ValueError(f"empty {prefix} token")
            if value.startswith("@"):
                break
            return _Token(kind, value)
    raise ValueError(f"unknown token {text!r}")


def _column_token(text: str, column: str) -> _Token:
    try:
        token = _token(text)
    except ValueError as error:
        raise ValueError(f"invalid {column} token {text!r}: {error}") from None
    if token.kind not in _COLUMN_KINDS[column]:
        raise ValueError(f"invalid {column} token {text!r}: not allowed there")
    return token


# -- rules -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """One policy line, legacy ones included (written with '@' and spaces, as v5)."""

    service: str  # a service name, or '*'
    argument: str  # '*', or '+ARG' ('+' alone: the empty argument)
    source: str
    target: str
    action: str  # allow, deny or ask
    params: dict[str, str] = field(default_factory=dict, hash=False)
    file: str = ""
    line: int = 0  # 0: a rule Qubes adds after a legacy file (!compat-4.0)

    @property
    def location(self) -> str:
        return f"{self.file}:{self.line}"

    def flag(self, name: str, default: bool) -> bool:
        value = self.params.get(name)
        return default if value is None else value == "yes"


def _check_service_and_argument(service: str, argument: str) -> None:
    if service != "*":
        invalid = sorted(set(service) - (_RPC_CHARACTERS - {"+"}))
        if invalid:
            raise ValueError(f"invalid characters {''.join(invalid)!r} in service {service!r}")
    if argument == "*":
        return
    invalid = sorted(set(argument) - _RPC_CHARACTERS)
    if invalid:
        raise ValueError(f"invalid characters {''.join(invalid)!r} in argument {argument!r}")
    if not argument.startswith("+"):
        raise ValueError(f"argument {argument!r} must be '*' or start with '+'")
    if service == "*":
        raise ValueError("a '*' service takes only a '*' argument")


def _parse_params(action: str, words: Iterable[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for word in words:
        key, equals, value = word.partition("=")
        if not equals:
            raise ValueError(f"parameter {word!r} is not KEY=VALUE")
        if key in params:
            raise ValueError(f"parameter {key!r} given twice")
        params[key] = value
    for key, value in params.items():
        if key not in _PARAMETERS[action]:
            raise ValueError(f"parameter {key!r} is not valid for action {action!r}")
        if key in _FLAGS and value not in ("yes", "no"):
            raise ValueError(f"{key}= must be 'yes' or 'no', not {value!r}")
        if key in _REDIRECTS:
            if not value:
                raise ValueError(f"empty {key}=")
            _column_token(value, f"{key}=")
    return params


def _rule(fields: list[str], file: str, line: int) -> Rule:
    """A rule from SERVICE ARGUMENT SOURCE TARGET ACTION [KEY=VALUE...]; ValueError says why not."""
    if len(fields) < 5:
        expected = "SERVICE ARGUMENT SOURCE TARGET ACTION [KEY=VALUE...]"
        raise ValueError(f"wrong number of fields: {len(fields)}, expected {expected}")
    service, argument, source, target, action = fields[:5]
    _check_service_and_argument(service, argument)
    _column_token(source, "source")
    target_kind = _column_token(target, "target").kind
    if action not in ACTIONS:
        raise ValueError(f"invalid action {action!r}: allow, deny or ask")
    params = _parse_params(action, fields[5:])
    if action == "allow" and target_kind == "default" and "target" not in params:
        raise ValueError("allow to @default needs a target=")
    return Rule(service, argument, source, target, action, params, file, line)


def _legacy_fields(line: str, service: str, argument: str) -> list[str]:
    """The v5 fields of a legacy line `SOURCE TARGET ACTION[,KEY=VALUE...]` for one service."""
    words = line.split()
    if len(words) < 3:
        expected = "SOURCE TARGET ACTION[,KEY=VALUE...]"
        raise ValueError(f"wrong number of fields: {len(words)}, expected {expected}")
    return [service, argument, *words]


def _legacy_substitutions(line: str) -> str:
    # R4.0 spelled '@' as '$', separated parameters with ',' and included with $include:PATH.
    return line.replace("$include:", "!include ").replace("$", "@").replace(",", " ")


def _content_lines(text: str) -> Iterator[tuple[int, str]]:
    """(number, stripped line) of every line but blank ones and comments."""
    for number, raw in enumerate(re.split(r"\r\n|\r|\n", text), start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            yield number, line


# -- files -----------------------------------------------------------------------------------------
class _InvalidFileName(ValueError):
    def __init__(self, path: str) -> None:
        name = os.path.basename(path)
        super().__init__(f"invalid policy file name {name!r}: only 0-9 a-z _ . - are allowed")
        self.path = path


def _is_policy_name(name: str) -> bool:
    return name.endswith(_POLICY_SUFFIX) and not name.startswith(".")


def _valid_file_name(name: str) -> bool:
    return set(name) <= _FILE_NAME_CHARACTERS


def _policy_files(directory: str, overrides: Mapping[str, str | None]) -> list[str]:
    """The policy files of a directory, sorted by name; _InvalidFileName when a name is invalid
    (one such file fails the whole policy, rather than being skipped)."""
    names = set()
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if _is_policy_name(name) and os.path.isfile(os.path.join(directory, name)):
                names.add(name)
    for path, text in overrides.items():
        name = os.path.basename(path)
        if os.path.dirname(path) == os.path.normpath(directory) and _is_policy_name(name):
            if text is None:
                names.discard(name)
            else:
                names.add(name)
    for name in sorted(names):
        if not _valid_file_name(name):
            raise _InvalidFileName(os.path.join(directory, name))
    return [os.path.join(directory, name) for name in sorted(names)]


def _legacy_files(directory: str) -> list[tuple[str, str, str]]:
    """(service, argument, path) of the R4.0 files, in !compat-4.0 order: by service, and per
    service the argument files (sorted) before the generic one."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        path = os.path.join(directory, name)
        if (
            os.path.isfile(path)
            and not name.startswith(".")
            and not name.endswith(_LEGACY_IGNORED_SUFFIXES)
            and set(name) <= _RPC_CHARACTERS
        ):
            service, plus, argument = name.partition("+")
            found.append((service, f"+{argument}" if plus else "*", path))
    return sorted(found, key=lambda entry: (entry[0], entry[1] == "*", entry[1]))


class _Loader:
    """Reads v5 and legacy files into one list of rules, following directives (unless `follow`
    is off, as for lint), and collects every syntax error with its file and line."""

    def __init__(
        self,
        legacy_dir: str = LEGACY_DIRECTORY,
        overrides: Mapping[str, str | None] | None = None,
        follow: bool = True,
    ) -> None:
        self.legacy_dir = legacy_dir
        self.overrides = {os.path.normpath(k): v for k, v in (overrides or {}).items()}
        self.follow = follow
        self.rules: list[Rule] = []
        self.errors: list[PolicySyntaxError] = []
        self._base = os.getcwd()
        self._reading: list[str] = []

    def top_level(self, path: str, text: str | None = None, service_file: bool = False) -> None:
        # Relative paths of directives resolve against the top-level file's folder, also in the
        # files it includes.
        self._base = os.path.dirname(path) or os.getcwd()
        try:
            if text is None:
                text = self._read(path)
        except ValueError as error:
            self.errors.append(PolicySyntaxError(path, 0, str(error)))
            return
        if service_file:
            self._legacy(path, text, "*", "*")
        else:
            self._v5(path, text)

    def _read(self, path: str) -> str:
        key = os.path.normpath(path)
        if key in self.overrides:
            text = self.overrides[key]
            if text is None:
                raise ValueError(f"not a file: {path} (it is to be removed)")
            return text
        if not os.path.isfile(path):
            raise ValueError(f"not a file: {path}")
        try:
            with open(path, encoding="utf-8") as handle:
                return handle.read()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot read {path}: {error}") from None

    def _enter(self, path: str) -> str:
        """The text of a file to be included; refuses a file that includes itself."""
        if os.path.normpath(path) in self._reading:
            raise ValueError(f"{path} includes itself")
        return self._read(path)

    def _v5(self, path: str, text: str) -> None:
        self._reading.append(os.path.normpath(path))
        for number, line in _content_lines(text):
            try:
                if line.startswith("!"):
                    self._directive(line.split())
                else:
                    self.rules.append(_rule(line.split(), path, number))
            except ValueError as error:
                self.errors.append(PolicySyntaxError(path, number, str(error)))
        self._reading.pop()

    def _directive(self, words: list[str]) -> None:
        name, arguments = words[0], words[1:]
        if name not in _DIRECTIVES:
            raise ValueError(f"invalid directive {name!r}")
        if len(arguments) != _DIRECTIVES[name]:
            raise ValueError(f"{name} takes {_DIRECTIVES[name]} parameter(s), not {len(arguments)}")
        if name == "!include-service":
            _check_service_and_argument(arguments[0], arguments[1])
        if not self.follow:
            return
        if name == "!include":
            path = self._resolve(arguments[0])
            self._v5(path, self._enter(path))
        elif name == "!include-dir":
            self._include_dir(self._resolve(arguments[0]))
        elif name == "!include-service":
            path = self._resolve(arguments[2])
            self._legacy(path, self._enter(path), arguments[0], arguments[1])
        else:
            self._compat()

    def _resolve(self, path: str) -> str:
        return os.path.normpath(os.path.join(self._base, path))

    def _include_dir(self, directory: str) -> None:
        if not os.path.isdir(directory):
            raise ValueError(f"not a directory: {directory}")
        try:
            paths = _policy_files(directory, self.overrides)
        except _InvalidFileName as error:
            raise ValueError(f"{directory}: {error}") from None
        for path in paths:
            self._v5(path, self._enter(path))

    def _legacy(self, path: str, text: str, service: str, argument: str) -> None:
        """A legacy (R4.0) file: its rules for one service and argument."""
        self._reading.append(os.path.normpath(path))
        for number, line in _content_lines(text):
            try:
                self._legacy_line(_legacy_substitutions(line), path, number, service, argument)
            except ValueError as error:
                self.errors.append(PolicySyntaxError(path, number, str(error)))
        self._reading.pop()

    def _legacy_line(self, line: str, path: str, number: int, service: str, argument: str) -> None:
        if not line.startswith("!"):
            self.rules.append(_rule(_legacy_fields(line, service, argument), path, number))
            return
        words = line.split()
        if words[0] != "!include":
            raise ValueError(f"invalid directive {words[0]!r} in a legacy file")
        if len(words) != 2:
            raise ValueError(f"!include takes 1 parameter(s), not {len(words) - 1}")
        if self.follow:
            included = self._resolve(words[1])
            self._legacy(included, self._enter(included), service, argument)

    def _compat(self) -> None:
        """!compat-4.0: the legacy files. After each argument file come the deny rules that were
        implicit in R4.0; nothing comes after a generic file, so that calls it does not decide
        fall through to the rest of the policy."""
        base, self._base = self._base, self.legacy_dir  # legacy $include: paths are relative to it
        try:
            for service, argument, path in _legacy_files(self.legacy_dir):
                _check_service_and_argument(service, argument)
                self._legacy(path, self._enter(path), service, argument)
                if argument != "*":
                    for target in ("@anyvm", "@adminvm"):
                        rule = Rule(service, argument, "@anyvm", target, "deny", {}, path)
                        self.rules.append(rule)
        finally:
            self._base = base


# -- decisions -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    allowed: bool
    target: str | None  # the final target: a qube name, or "@dispvm:V" for a new disposable
    user: str | None  # None: the target's default user
    autostart: bool
    notify: bool
    rule: Rule | None
    reason: str
    requested_target_type: str = "name"  # or "keyword" (QREXEC_REQUESTED_TARGET_TYPE in dom0)
    # The requested target as Qubes passes it on: as asked, or "@default" for an empty or unknown
    # one (QREXEC_REQUESTED_TARGET[_KEYWORD] in dom0).
    requested_target: str = ""

    @property
    def rule_location(self) -> str:
        return self.rule.location if self.rule else ""


def _target_type(requested: str) -> str:
    return "keyword" if requested.startswith("@") or requested == "*" else "name"


def _denied(reason: str, requested: str, rule: Rule | None = None, notify: bool = True) -> Decision:
    requested = requested or "@default"
    return Decision(
        False, None, None, False, notify, rule, reason, _target_type(requested), requested
    )


def _intended_target(requested: str, system: System) -> tuple[str, str]:
    """(what rules are matched against, what Qubes passes on) for a requested target: a qube's
    name (dom0 included), or @adminvm, @default, @dispvm, @dispvm:TEMPLATE. ValueError when a
    call may not ask for it."""
    if requested in ("", "@default"):
        return "@default", "@default"
    if requested in ("@adminvm", "@dispvm"):
        return requested, requested
    if requested.startswith("@dispvm:") and not requested.startswith("@dispvm:@"):
        template = system.get(requested[len("@dispvm:") :])
        if template is None or not template.template_for_dispvms:
            raise ValueError(f"{requested[len('@dispvm:') :]!r} is not a template for disposables")
        return f"@dispvm:{template.name}", requested
    if requested == "*" or requested.startswith("@"):
        raise ValueError(f"a call cannot ask for {requested!r}")
    qube = system.get(requested)
    if qube is None:  # an unknown qube is no error: the policy decides what @default is
        return "@default", "@default"
    return qube.name, requested


def _is_admin_vm(target: str) -> bool:
    return target in (ADMIN_VM, "@adminvm")


def _same_qube(reference: str, name: str | None, system: System) -> bool:
    """Whether a name or uuid: reference names the qube called `name`."""
    qube = system.get(reference)
    return qube is not None and qube.name == name


def _disposable_template(target: str, source: Qube, system: System) -> Qube | None:
    """The disposable template a @dispvm or @dispvm:V target means, if any."""
    if target == "@dispvm":
        return system.get(source.default_dispvm) if source.default_dispvm else None
    if target.startswith("@dispvm:"):
        return system.get(target[len("@dispvm:") :])
    return None


def _source_matches(token: _Token, source: Qube, system: System) -> bool:
    kind = token.kind
    if kind in ("any", "anyvm", "adminvm"):
        return kind == "any" or (source.name == ADMIN_VM) == (kind == "adminvm")
    if kind == "name":
        return token.value == source.name
    if kind == "uuid":
        return _same_qube(f"uuid:{token.value}", source.name, system)
    if kind == "tag":
        return token.value in source.tags
    return kind == "type" and source.klass == token.value  # @dispvm:... never matches a source


def _target_matches(token: _Token, target: str, source: Qube, system: System) -> bool:
    kind = token.kind
    if kind in ("any", "anyvm", "adminvm"):
        return kind == "any" or _is_admin_vm(target) == (kind == "adminvm")
    if kind in ("default", "dispvm"):
        return target == f"@{kind}"
    if kind in ("dispvm_for", "dispvm_tag"):
        template = _disposable_template(target, source, system)
        if template is None:
            return False
        if kind == "dispvm_for":  # @dispvm:V also matches @dispvm from a qube whose default is V
            return _same_qube(token.value, template.name, system)
        return template.template_for_dispvms and token.value in template.tags
    # The rest match a qube asked for by name (dom0 too), never a keyword such as @adminvm.
    qube = None if target.startswith("@") else system.get(target)
    if qube is None:
        return False
    if kind == "tag":
        return token.value in qube.tags
    if kind == "type":
        return qube.klass == token.value
    reference = token.value if kind == "name" else f"uuid:{token.value}"
    return _same_qube(reference, qube.name, system)


def _final_target(target: str, source: Qube, system: System) -> str:
    """Where an allowed call goes: a qube's name or @dispvm:TEMPLATE; ValueError when nowhere."""
    if target == "@default":
        raise ValueError("no target: the call asks for @default and the rule has no target=")
    if target == "@dispvm":
        if not source.default_dispvm:
            raise ValueError(f"{source.name} asks for @dispvm but has no default_dispvm")
        return f"@dispvm:{source.default_dispvm}"
    if target.startswith("@dispvm:"):
        template = system.get(target[len("@dispvm:") :])
        if template is None or not template.template_for_dispvms:
            raise ValueError(f"{target[len('@dispvm:') :]!r} is not a template for disposables")
        return f"@dispvm:{template.name}"
    if _token(target).kind == "adminvm":
        return ADMIN_VM
    qube = system.get(target)
    if qube is None:
        raise ValueError(f"the target {target!r} does not exist")
    return qube.name


def _needs_start(target: str, system: System) -> bool:
    if target == ADMIN_VM:
        return False
    if target.startswith("@dispvm:"):
        return True  # a new disposable is always started
    qube = system.get(target)
    return qube is None or not qube.running


def _expand(token: _Token, system: System) -> set[str]:
    """The targets a token stands for, as choices of an ask."""
    kind = token.kind
    if kind in ("any", "anyvm"):
        names = {q.name for q in system if kind == "any" or q.name != ADMIN_VM}
        disposables = {f"@dispvm:{q.name}" for q in system if q.template_for_dispvms}
        return names | disposables | {"@dispvm"}
    if kind in ("adminvm", "dispvm"):
        return {f"@{kind}"}
    if kind in ("dispvm_for", "dispvm_tag"):
        return {
            f"@dispvm:{q.name}"
            for q in system
            if q.template_for_dispvms
            and (
                _same_qube(token.value, q.name, system)
                if kind == "dispvm_for"
                else token.value in q.tags
            )
        }
    if kind == "tag":
        return {q.name for q in system if token.value in q.tags}
    if kind == "type":
        return {q.name for q in system if q.klass == token.value}
    if kind in ("name", "uuid"):
        qube = system.get(token.value if kind == "name" else f"uuid:{token.value}")
        return {qube.name} if qube else set()
    return set()  # @default stands for no qube


class Policy:
    """The rules of a whole policy, in order."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        self._rules = list(rules)

    @property
    def rules(self) -> list[Rule]:
        return list(self._rules)

    @classmethod
    def load(
        cls,
        policy_dirs: Iterable[str] = POLICY_DIRECTORIES,
        legacy_dir: str = LEGACY_DIRECTORY,
        replacing: Mapping[str, str | None] | None = None,
    ) -> Policy:
        """The installed policy; PolicySyntaxError for the first error (a caller then denies every
        call). `replacing` maps paths to the text they are about to have (None: to be removed), so
        that a file can be checked with the whole policy before it is installed."""
        overrides = {os.path.normpath(k): v for k, v in (replacing or {}).items()}
        chosen: dict[str, str] = {}
        for directory in policy_dirs:
            try:
                paths = _policy_files(directory, overrides)
            except _InvalidFileName as error:
                raise PolicySyntaxError(error.path, 0, str(error)) from None
            for path in paths:  # an earlier directory overrides a same-named file of a later one
                chosen.setdefault(os.path.basename(path), path)
        loader = _Loader(legacy_dir, overrides)
        for name in sorted(chosen):
            loader.top_level(chosen[name])
        if loader.errors:
            raise loader.errors[0]
        return cls(loader.rules)

    @classmethod
    def from_text(
        cls, text: str, filename: str = "<text>", legacy_dir: str = LEGACY_DIRECTORY
    ) -> Policy:
        """One v5 file's text. Relative directive paths resolve against the folder of `filename`,
        as for an installed file, or the working directory when it has no folder."""
        loader = _Loader(legacy_dir)
        loader.top_level(filename, text)
        if loader.errors:
            raise loader.errors[0]
        return cls(loader.rules)

    def evaluate(self, request: Request, system: System) -> Decision:
        # Qubes does not look the source up before matching: a source it does not know is still
        # matched by `*`, `@anyvm` and its own name, never by a tag, a type or a uuid.
        source = system.get(request.source) or Qube(request.source, klass="")
        try:
            target, requested = _intended_target(request.target, system)
        except ValueError as error:
            return _denied(str(error), request.target)
        rule = self._first_match(request, source, target, system)
        if rule is None:
            return _denied("no matching rule found", requested)
        if rule.action == "deny":
            return _denied(
                f"denied by policy {rule.location}", requested, rule, rule.flag("notify", True)
            )
        if rule.action == "ask":
            return self._ask(rule, request, source, system, requested)
        return self._allow(rule, target, source, system, requested)

    def _matches_but_target(
        self, rule: Rule, request: Request, source: Qube, system: System
    ) -> bool:
        return (
            rule.service in ("*", request.service)
            and rule.argument in ("*", f"+{request.argument}")
            and _source_matches(_token(rule.source), source, system)
        )

    def _first_match(
        self, request: Request, source: Qube, target: str, system: System
    ) -> Rule | None:
        for rule in self._rules:
            if self._matches_but_target(rule, request, source, system) and _target_matches(
                _token(rule.target), target, source, system
            ):
                return rule
        return None

    @staticmethod
    def _allow(rule: Rule, target: str, source: Qube, system: System, requested: str) -> Decision:
        # The rule matched what the caller asked for; target= only changes where the call goes.
        try:
            final = _final_target(rule.params.get("target") or target, source, system)
        except ValueError as error:
            return _denied(f"{error} ({rule.location})", requested, rule)
        autostart = rule.flag("autostart", True)
        notify = rule.flag("notify", False)
        if not autostart and _needs_start(final, system):
            reason = f"{final} is not running and autostart=no ({rule.location})"
            return _denied(reason, requested, rule, notify)
        # A call whose final target is its source is allowed here, as in Qubes' evaluation; it is
        # refused only when run (see `refusal_when_run`).
        user = rule.params.get("user") or None
        reason = f"allowed by policy {rule.location}"
        return Decision(
            True, final, user, autostart, notify, rule, reason, _target_type(requested), requested
        )

    def _ask(
        self, rule: Rule, request: Request, source: Qube, system: System, requested: str
    ) -> Decision:
        """An ask is refused, since no person is there to answer; the reason says whether there
        would have been anything to choose from."""
        choices = self._ask_choices(rule, request, source, system)
        why = "no user to ask" if choices else "no target to choose from"
        return _denied(f"ask action refused: {why} ({rule.location})", requested, rule)

    def _ask_choices(self, rule: Rule, request: Request, source: Qube, system: System) -> set[str]:
        redirect = rule.params.get("target")
        if redirect:
            choices = {ADMIN_VM if _token(redirect).kind == "adminvm" else redirect}
        else:
            choices = self._candidates(request, source, system)
        if not rule.flag("autostart", True):
            choices = {c for c in choices if not _needs_start(c, system)}
        return choices

    def _candidates(self, request: Request, source: Qube, system: System) -> set[str]:
        """What the rules for this service, argument and source allow: read from the last rule
        to the first, so that an earlier deny takes away what a later rule grants."""
        targets: set[str] = set()
        for rule in reversed(self._rules):
            if self._matches_but_target(rule, request, source, system):
                expansion = _expand(_token(rule.params.get("target") or rule.target), system)
                if rule.action == "deny":
                    targets -= expansion
                else:
                    targets |= expansion
        if "@dispvm" in targets:
            targets.discard("@dispvm")
            if source.default_dispvm:
                targets.add(f"@dispvm:{source.default_dispvm}")
        if "@adminvm" in targets:
            targets.discard("@adminvm")
            targets.add(ADMIN_VM)
        targets.discard(source.name)
        return targets


LOOPBACK_REFUSAL = "loopback qrexec connection not supported"


def refusal_when_run(request: Request, decision: Decision) -> str | None:
    """Why Qubes refuses to run a call its policy allowed, or None: a call whose final target is
    the source itself passes evaluation (qrexec-policy-exec --just-evaluate says allow) and is
    refused only when it is about to run."""
    if decision.allowed and decision.target == request.source:
        return LOOPBACK_REFUSAL
    return None


def lint(paths: Iterable[str], service_files: bool = False) -> list[PolicySyntaxError]:
    """Every syntax error of every file, each file checked on its own (qubes-policy-lint):
    directives are checked but not followed. `service_files`: the files are in the legacy syntax
    of !include-service targets (qubes-policy-lint -i)."""
    errors: list[PolicySyntaxError] = []
    for path in paths:
        name = os.path.basename(path)
        if _is_policy_name(name) and not _valid_file_name(name):
            errors.append(PolicySyntaxError(path, 0, str(_InvalidFileName(path))))
        loader = _Loader(follow=False)
        loader.top_level(path, service_file=service_files)
        errors.extend(loader.errors)
    return errors
