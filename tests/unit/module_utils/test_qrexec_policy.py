"""Conformance of the qrexec policy engine with Qubes' policy semantics (grammar, tokens, parse
errors, evaluation rules, file loading), plus the Salt formula's own policy."""

from __future__ import annotations

from pathlib import Path

import pytest
from ansible_collections.qubes_infra.build.plugins.module_utils.qrexec_policy import (
    Decision,
    Policy,
    PolicySyntaxError,
    Qube,
    Request,
    System,
    lint,
)

SYSTEM = System(
    [
        Qube("dom0", "AdminVM", uuid="00000000-0000-0000-0000-000000000000"),
        Qube("work", "AppVM", tags=frozenset({"office"}), default_dispvm="dvm", uuid="1111"),
        Qube("vault", "AppVM", tags=frozenset({"secret"}), running=False, uuid="2222"),
        Qube("mail", "AppVM", running=True),
        Qube("debian-12", "TemplateVM"),
        Qube("dvm", "AppVM", tags=frozenset({"disp"}), template_for_dispvms=True),
        Qube("nodisp", "AppVM"),
    ]
)


def decide(
    policy: str, source: str, target: str, service: str = "test.Svc", argument: str = ""
) -> Decision:
    return Policy.from_text(policy, "test.policy").evaluate(
        Request(source, target, service, argument), SYSTEM
    )


def allowed(policy: str, source: str, target: str, **kwargs: str) -> bool:
    return decide(policy, source, target, **kwargs).allowed


# -- grammar ---------------------------------------------------------------------------------------
def test_comments_blank_lines_and_whitespace() -> None:
    policy = "# a comment\n\n   \n  # indented comment\ntest.Svc\t*   work\tmail  allow\n"
    decision = decide(policy, "work", "mail")
    assert decision.allowed and decision.rule_location == "test.policy:5"


def test_inline_comments_are_errors() -> None:
    with pytest.raises(PolicySyntaxError, match=r"test.policy:1: "):
        Policy.from_text("test.Svc * work mail allow # no\n", "test.policy")


def test_service_and_argument_match_by_equality_or_star() -> None:
    policy = "test.Svc +a work mail allow\nother.Svc * work mail allow\n"
    assert allowed(policy, "work", "mail", argument="a")
    assert not allowed(policy, "work", "mail", argument="ab")
    assert not allowed(policy, "work", "mail", service="test.Sv")
    assert allowed(policy, "work", "mail", service="other.Svc", argument="anything")
    assert allowed("* * work mail allow\n", "work", "mail", service="any.Thing", argument="x")


def test_a_call_without_argument_is_matched_as_plus() -> None:
    policy = "test.Svc + work mail allow\n"
    assert allowed(policy, "work", "mail")
    assert not allowed(policy, "work", "mail", argument="x")


# -- parse errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("test.Svc * work mail", "wrong number of fields"),
        ("test.Svc * work mail Allow", "invalid action 'Allow'"),
        ("test.Svc * work mail permit", "invalid action 'permit'"),
        ("test/Svc * work mail allow", "invalid service"),
        ("test+Svc * work mail allow", "invalid service"),
        ("test.Svc +a/b work mail allow", "invalid argument"),
        ("test.Svc arg work mail allow", "must be '*' or start with '+'"),
        ("* +arg work mail allow", "a '*' service only takes a '*' argument"),
        ("test.Svc * @default mail allow", "invalid source token '@default'"),
        ("test.Svc * @dispvm mail allow", "invalid source token '@dispvm'"),
        ("test.Svc * @something mail allow", "invalid source"),
        ("test.Svc * work @something allow", "invalid target"),
        ("test.Svc * work mail allow target=@anyvm", "invalid target= token '@anyvm'"),
        ("test.Svc * work mail allow target=*", "invalid target= token '*'"),
        ("test.Svc * work mail allow target=@default", "invalid target= token '@default'"),
        ("test.Svc * work mail allow target=@tag:x", "invalid target= token '@tag:x'"),
        ("test.Svc * work mail allow target=@type:AppVM", "invalid target= token '@type:AppVM'"),
        ("test.Svc * @tag: mail allow", "empty '@tag:' token"),
        ("test.Svc * work @type: allow", "empty '@type:' token"),
        ("test.Svc * work @dispvm: allow", "empty '@dispvm:' token"),
        ("test.Svc * work mail allow target=", "empty target="),
        ("test.Svc * work mail allow notify", "expected KEY=VALUE"),
        ("test.Svc * work mail allow user=a user=b", "parameter 'user' given twice"),
        ("test.Svc * work mail allow notify=maybe", "notify= must be yes or no"),
        ("test.Svc * work mail allow autostart=1", "autostart= must be yes or no"),
        (
            "test.Svc * work mail deny target=mail",
            "parameter 'target' is not valid for action 'deny'",
        ),
        ("test.Svc * work mail allow default_target=mail", "'default_target' is not valid"),
        ("test.Svc * work mail allow colour=red", "parameter 'colour' is not valid"),
        ("test.Svc * work @default allow", "allow with a @default target needs target="),
        ("!unknown-directive x", "unknown directive"),
        ("!include", "!include takes 1 argument"),
    ],
)
def test_parse_errors_name_file_line_and_rule(line: str, message: str) -> None:
    with pytest.raises(PolicySyntaxError) as error:
        Policy.from_text(f"# first line\n{line}\n", "20-test.policy")
    assert str(error.value).startswith("20-test.policy:2: ")
    assert message in error.value.message


@pytest.mark.parametrize(
    "line",
    [
        "test.Svc * work @default ask",
        "test.Svc * work @default ask default_target=mail",
        "test.Svc * work @default allow target=mail",
        "test.Svc * @dispvm:dvm mail allow",
        "test.Svc * work @dispvm:@tag:disp allow",
        "test.Svc * uuid:1111 uuid:2222 allow target=uuid:2222 user=root notify=yes autostart=no",
        "test.Svc * work mail deny notify=no",
        "test.Svc + dom0 @adminvm allow",
    ],
)
def test_valid_lines(line: str) -> None:
    assert len(Policy.from_text(line + "\n").rules) == 1


# -- tokens ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("source_token", "matching", "not_matching"),
    [
        ("work", "work", "mail"),
        ("uuid:1111", "work", "mail"),
        ("*", "dom0", None),
        ("@anyvm", "work", "dom0"),
        ("@adminvm", "dom0", "work"),
        ("dom0", "dom0", "work"),
        ("@tag:office", "work", "mail"),
        ("@type:TemplateVM", "debian-12", "work"),
        ("@type:AdminVM", "dom0", "work"),
        ("@dispvm:dvm", None, "work"),  # a disposable-template token never matches a source
    ],
)
def test_source_tokens(source_token: str, matching: str | None, not_matching: str | None) -> None:
    policy = f"test.Svc * {source_token} @anyvm allow target=vault\n"
    if matching:
        assert allowed(policy, matching, "vault")
    if not_matching:
        assert not allowed(policy, not_matching, "vault")


@pytest.mark.parametrize(
    ("target_token", "matching", "not_matching"),
    [
        ("mail", "mail", "vault"),
        ("uuid:2222", "vault", "mail"),
        ("*", "dom0", None),
        ("@anyvm", "mail", "dom0"),
        ("@adminvm", "dom0", "mail"),
        ("dom0", "@adminvm", "mail"),
        ("@tag:secret", "vault", "mail"),
        ("@type:TemplateVM", "debian-12", "mail"),
        ("@default", "", "mail"),
    ],
)
def test_target_tokens(target_token: str, matching: str | None, not_matching: str | None) -> None:
    policy = f"test.Svc * work {target_token} allow target=mail\n"
    if matching is not None:
        assert decide(policy, "work", matching).rule is not None
    if not_matching is not None:
        assert decide(policy, "work", not_matching).rule is None


def test_anyvm_target_matches_default_and_dispvm_requests() -> None:
    policy = "test.Svc * work @anyvm allow target=mail\n"
    assert allowed(policy, "work", "")
    assert allowed(policy, "work", "@dispvm")


def test_dispvm_tokens() -> None:
    literal = "test.Svc * work @dispvm allow\n"
    assert decide(literal, "work", "@dispvm").target == "@dispvm:dvm"
    assert decide(literal, "work", "@dispvm:dvm").rule is None
    named = "test.Svc * @anyvm @dispvm:dvm allow\n"
    assert decide(named, "work", "@dispvm:dvm").target == "@dispvm:dvm"
    assert decide(named, "work", "@dispvm").target == "@dispvm:dvm"  # work's default_dispvm
    assert decide(named, "mail", "@dispvm").rule is None  # mail has no default_dispvm
    tagged = "test.Svc * work @dispvm:@tag:disp allow\n"
    assert decide(tagged, "work", "@dispvm:dvm").target == "@dispvm:dvm"


def test_redirect_tokens() -> None:
    assert decide("test.Svc * work mail allow target=vault\n", "work", "mail").target == "vault"
    assert decide("test.Svc * work @default allow target=uuid:2222\n", "work", "").target == "vault"
    assert decide("test.Svc * work mail allow target=@adminvm\n", "work", "mail").target == "dom0"
    assert decide("test.Svc * work mail allow target=dom0\n", "work", "mail").target == "dom0"
    dispvm = decide("test.Svc * work mail allow target=@dispvm\n", "work", "mail")
    assert dispvm.target == "@dispvm:dvm"
    named = decide("test.Svc * work mail allow target=@dispvm:dvm\n", "work", "mail")
    assert named.target == "@dispvm:dvm"


# -- evaluation ------------------------------------------------------------------------------------
def test_first_match_wins_and_names_its_rule() -> None:
    policy = "test.Svc * work mail deny\ntest.Svc * work mail allow\n"
    decision = decide(policy, "work", "mail")
    assert not decision.allowed
    assert decision.reason == "denied by policy test.policy:1"
    assert decision.rule_location == "test.policy:1"
    assert decision.notify  # deny notifies by default


def test_no_matching_rule_denies() -> None:
    decision = decide("test.Svc * work vault allow\n", "work", "mail")
    assert (decision.allowed, decision.reason, decision.rule) == (
        False,
        "no matching rule found",
        None,
    )


def test_redirect_matches_what_was_asked_and_changes_only_the_target() -> None:
    policy = "qubesbuilder.LogReceived +build-fedora build-logs dom0 allow target=keys-fedora\n"
    system = System(
        [Qube("dom0", "AdminVM"), Qube("build-logs", "AppVM"), Qube("keys-fedora", "AppVM")]
    )
    decision = Policy.from_text(policy).evaluate(
        Request("build-logs", "dom0", "qubesbuilder.LogReceived", "build-fedora"), system
    )
    assert (decision.allowed, decision.target) == (True, "keys-fedora")
    other = Request("build-logs", "keys-fedora", "qubesbuilder.LogReceived", "build-fedora")
    assert not Policy.from_text(policy).evaluate(other, system).allowed


@pytest.mark.parametrize("target", ["", "no-such-qube", "@default"])
def test_empty_or_unknown_targets_are_default(target: str) -> None:
    assert decide("test.Svc * work @default allow target=mail\n", "work", target).target == "mail"


@pytest.mark.parametrize("target", ["@anyvm", "*", "@tag:office", "@type:AppVM"])
def test_requests_for_patterns_are_denied_outright(target: str) -> None:
    assert not allowed("test.Svc * @anyvm * allow target=mail\n", "work", target)


def test_allow_resolving_to_default_without_target_is_denied() -> None:
    decision = decide("test.Svc * work @anyvm allow\n", "work", "")
    assert not decision.allowed
    assert "@default" in decision.reason


def test_dispvm_request_without_default_dispvm_is_denied() -> None:
    decision = decide("test.Svc * @anyvm @dispvm allow\n", "nodisp", "@dispvm")
    assert not decision.allowed
    assert "default_dispvm" in decision.reason


def test_dispvm_request_for_a_non_disposable_template_is_denied() -> None:
    assert not allowed("test.Svc * work @anyvm allow\n", "work", "@dispvm:mail")


def test_autostart() -> None:
    assert decide("test.Svc * work vault allow\n", "work", "vault").autostart
    halted = decide("test.Svc * work vault allow autostart=no\n", "work", "vault")
    assert not halted.allowed and "autostart=no" in halted.reason
    assert allowed("test.Svc * work mail allow autostart=no\n", "work", "mail")  # mail runs


def test_a_qube_cannot_call_itself() -> None:
    assert not allowed("test.Svc * work @anyvm allow\n", "work", "work")
    assert not allowed("test.Svc * work mail allow target=work\n", "work", "mail")


def test_ask_is_refused_without_a_person() -> None:
    decision = decide("test.Svc * work mail ask default_target=mail\n", "work", "mail")
    assert not decision.allowed
    assert decision.reason.startswith("ask action refused")


def test_user_and_notify_parameters() -> None:
    decision = decide("test.Svc * work mail allow user=root notify=yes\n", "work", "mail")
    assert (decision.user, decision.notify) == ("root", True)
    plain = decide("test.Svc * work mail allow\n", "work", "mail")
    assert (plain.user, plain.notify, plain.autostart) == (None, False, True)


def test_requested_target_type() -> None:
    policy = "test.Svc * work @adminvm allow\n"
    assert decide(policy, "work", "dom0").requested_target_type == "name"
    assert decide(policy, "work", "@adminvm").requested_target_type == "keyword"


def test_target_that_does_not_exist_is_denied() -> None:
    assert not allowed("test.Svc * work mail allow target=ghost\n", "work", "mail")


# -- files -----------------------------------------------------------------------------------------
def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_files_are_read_in_name_order_and_run_overrides_etc(tmp_path: Path) -> None:
    run, etc = tmp_path / "run", tmp_path / "etc"
    _write(etc / "30-user.policy", "test.Svc * work mail allow\n")
    _write(etc / "20-first.policy", "test.Svc * work mail deny\n")
    _write(run / "20-first.policy", "test.Svc * work vault deny\n")
    _write(etc / "10-ignored.txt", "garbage\n")
    _write(etc / ".10-hidden.policy", "garbage\n")
    _write(etc / "sub" / "00-nested.policy", "garbage\n")
    policy = Policy.load([str(run), str(etc)], str(tmp_path / "legacy"))
    assert [rule.location for rule in policy.rules] == [
        f"{run}/20-first.policy:1",
        f"{etc}/30-user.policy:1",
    ]
    request = Request("work", "mail", "test.Svc")
    assert policy.evaluate(request, SYSTEM).allowed


def test_an_invalid_file_name_fails_the_whole_policy(tmp_path: Path) -> None:
    _write(tmp_path / "30-User.policy", "test.Svc * work mail allow\n")
    with pytest.raises(PolicySyntaxError, match="invalid policy file name"):
        Policy.load([str(tmp_path)], str(tmp_path / "legacy"))


def test_a_syntax_error_anywhere_fails_the_whole_policy(tmp_path: Path) -> None:
    _write(tmp_path / "20-good.policy", "test.Svc * work mail allow\n")
    _write(tmp_path / "90-bad.policy", "test.Svc * work mail allow\nbroken line\n")
    with pytest.raises(PolicySyntaxError, match=r"90-bad.policy:2: wrong number of fields"):
        Policy.load([str(tmp_path)], str(tmp_path / "legacy"))


def test_include_directives(tmp_path: Path) -> None:
    _write(tmp_path / "included" / "a.policy", "test.Svc +a work mail allow\n")
    _write(tmp_path / "included" / "b.policy", "test.Svc +b work mail allow\n")
    _write(tmp_path / "one.policy", "test.Svc +one work mail allow\n")
    _write(tmp_path / "legacy-style", "work mail allow\n$anyvm $anyvm deny\n")
    _write(
        tmp_path / "top" / "20-top.policy",
        f"!include {tmp_path}/one.policy\n!include-dir ../included\n"
        f"!include-service test.Svc +legacy {tmp_path}/legacy-style\n",
    )
    policy = Policy.load([str(tmp_path / "top")], str(tmp_path / "no-legacy"))
    arguments = [rule.argument for rule in policy.rules]
    assert arguments == ["+one", "+a", "+b", "+legacy", "+legacy"]
    assert policy.evaluate(Request("work", "mail", "test.Svc", "legacy"), SYSTEM).allowed


def test_compat_legacy_files(tmp_path: Path) -> None:
    legacy = tmp_path / "legacy"
    _write(legacy / "local.ConnectSSH+github.com", "build-fedora sys-net allow\n")
    _write(legacy / "local.ConnectSSH", "$anyvm $anyvm deny\n")
    _write(legacy / "test.Svc", "$tag:office $default allow,target=mail\n")
    _write(tmp_path / "policy" / "35-compat.policy", "!compat-4.0\n")
    policy = Policy.load([str(tmp_path / "policy")], str(legacy))
    described = [
        (r.service, r.argument, str(r.source), str(r.target), r.action) for r in policy.rules
    ]
    assert described == [
        ("local.ConnectSSH", "+github.com", "build-fedora", "sys-net", "allow"),
        ("local.ConnectSSH", "+github.com", "@anyvm", "@anyvm", "deny"),
        ("local.ConnectSSH", "+github.com", "@anyvm", "@adminvm", "deny"),
        ("local.ConnectSSH", "*", "@anyvm", "@anyvm", "deny"),
        ("test.Svc", "*", "@tag:office", "@default", "allow"),
    ]
    assert policy.evaluate(Request("work", "", "test.Svc"), SYSTEM).target == "mail"


def test_lint_reports_every_error_of_every_file(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.policy", "test.Svc * work mail allow\n")
    bad = _write(tmp_path / "bad.policy", "one two\ntest.Svc * work mail allow\nx * z w nope\n")
    errors = [str(error) for error in lint([str(good), str(bad)])]
    assert errors == [
        f"{bad}:1: wrong number of fields: 2 (at least 5)",
        f"{bad}:3: invalid action 'nope'",
    ]


# -- the Salt formula's policy, for an env `fedora` ------------------------------------------------
FORMULA = """\
qubesbuilder.LogReceived +build-fedora build-logs dom0 allow target=keys-fedora
qubes.Gpg * build-fedora keys-fedora allow
qubes.Gpg * build-fedora @default allow target=keys-fedora
qubes.Gpg * @anyvm keys-fedora deny
qubesbuilder.BuildLog * build-fedora dom0 allow target=build-logs
qubesbuilder.TriggerBuild * sys-net build-fedora allow
qubesbuilder.ProcessGithubCommand * sys-net build-fedora allow
local.ConnectSSH +github.com build-fedora sys-net allow
local.ConnectSSH * @anyvm @anyvm deny
"""
FORMULA_SYSTEM = System(
    [Qube("dom0", "AdminVM")]
    + [
        Qube(name, "AppVM")
        for name in ("build-fedora", "keys-fedora", "build-logs", "sys-net", "build-other", "work")
    ]
)


@pytest.mark.parametrize(
    ("source", "target", "service", "argument", "expected"),
    [
        ("build-logs", "dom0", "qubesbuilder.LogReceived", "build-fedora", "keys-fedora"),
        ("build-logs", "dom0", "qubesbuilder.LogReceived", "build-other", None),
        ("build-fedora", "dom0", "qubesbuilder.LogReceived", "build-fedora", None),
        ("build-fedora", "keys-fedora", "qubes.Gpg", "", "keys-fedora"),
        ("build-fedora", "", "qubes.Gpg", "", "keys-fedora"),
        ("work", "keys-fedora", "qubes.Gpg", "", None),
        ("build-other", "keys-fedora", "qubes.Gpg", "", None),
        ("build-fedora", "dom0", "qubesbuilder.BuildLog", "", "build-logs"),
        ("work", "dom0", "qubesbuilder.BuildLog", "", None),
        ("sys-net", "build-fedora", "qubesbuilder.TriggerBuild", "core-admin", "build-fedora"),
        ("work", "build-fedora", "qubesbuilder.TriggerBuild", "core-admin", None),
        ("sys-net", "build-fedora", "qubesbuilder.ProcessGithubCommand", "", "build-fedora"),
        ("build-fedora", "sys-net", "local.ConnectSSH", "github.com", "sys-net"),
        ("build-fedora", "sys-net", "local.ConnectSSH", "evil.example", None),
        ("work", "sys-net", "local.ConnectSSH", "github.com", None),
        ("keys-fedora", "build-logs", "qubesbuilder.BuildLog", "", None),
    ],
)
def test_salt_formula_policy(
    source: str, target: str, service: str, argument: str, expected: str | None
) -> None:
    decision = Policy.from_text(FORMULA, "20-qubesbuilder.policy").evaluate(
        Request(source, target, service, argument), FORMULA_SYSTEM
    )
    assert (decision.target if decision.allowed else None) == expected
