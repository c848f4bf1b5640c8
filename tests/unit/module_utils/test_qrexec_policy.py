"""Conformance of the qrexec policy engine with Qubes' policy semantics (qubes-core-qrexec 4.x):
grammar, tokens per column, actions and parameters, parse errors, evaluation rules, file loading
and directives, lint, and the Salt formula's own policy."""

from __future__ import annotations

from pathlib import Path

import pytest
from ansible_collections.qubes_infra.build.plugins.module_utils import qrexec_policy

from qubesim.tools import qrexec_policy_exec

Decision = qrexec_policy.Decision
Policy = qrexec_policy.Policy
PolicySyntaxError = qrexec_policy.PolicySyntaxError
Qube = qrexec_policy.Qube
Request = qrexec_policy.Request
Rule = qrexec_policy.Rule
System = qrexec_policy.System

DOM0_UUID = "00000000-0000-0000-0000-000000000000"
WORK_UUID = "11111111-1111-1111-1111-111111111111"
VAULT_UUID = "22222222-2222-2222-2222-222222222222"
SYSTEM = System(
    [
        Qube("dom0", "AdminVM", tags=frozenset({"admin-tag"})),
        Qube("work", "AppVM", tags=frozenset({"office"}), default_dispvm="dvm", uuid=WORK_UUID),
        Qube("vault", "AppVM", tags=frozenset({"secret"}), running=False, uuid=VAULT_UUID),
        Qube("mail", "AppVM"),
        Qube("debian-12", "TemplateVM"),
        Qube("dvm", "AppVM", tags=frozenset({"disp"}), template_for_dispvms=True),
        Qube("dvm-plain", "AppVM", template_for_dispvms=True),
        Qube("plain", "AppVM", default_dispvm="dvm-plain"),
        Qube("nodisp", "AppVM"),
        Qube("disp1234", "DispVM"),
        Qube("standalone", "StandaloneVM"),
    ]
)


def decide(
    text: str, source: str, target: str, service: str = "test.Svc", argument: str = ""
) -> Decision:
    policy = Policy.from_text(text, "test.policy")
    decision = policy.evaluate(Request(source, target, service, argument), SYSTEM)
    full_service = f"{service}+{argument}" if argument else service
    assert just_evaluate(policy, source, target, full_service) == (decision.allowed, "")
    return decision


def just_evaluate(policy: Policy, source: str, target: str, full_service: str) -> tuple[bool, str]:
    """The differential check, run for every case of this suite: qubesim's
    `qrexec-policy-exec --just-evaluate` allows (exit 0) exactly when the case says Qubes'
    evaluation allows, and prints nothing (qrexec/tools/qrexec_policy_exec.py, get_result:
    JustEvaluateAllowResolution answers allow without the loopback check of a real run)."""
    code, output = qrexec_policy_exec.answer(
        lambda request: policy.evaluate(request, SYSTEM),
        SYSTEM,
        (source, target, full_service),
        just_evaluate=True,
    )
    assert code in (0, 1)
    return code == 0, output


def policy_exec(text: str, source: str, target: str) -> tuple[int, str]:
    """qrexec-policy-exec's three-argument form without --just-evaluate: (exit code, stdout)."""
    policy = Policy.from_text(text, "test.policy")
    return qrexec_policy_exec.answer(
        lambda request: policy.evaluate(request, SYSTEM),
        SYSTEM,
        (source, target, "test.Svc"),
        just_evaluate=False,
    )


def matched(text: str, source: str, target: str, **kwargs: str) -> bool:
    """Whether the policy's first line decides the call (allow, deny or ask alike)."""
    return decide(text, source, target, **kwargs).rule_location == "test.policy:1"


def syntax_error(text: str, filename: str = "test.policy") -> PolicySyntaxError:
    with pytest.raises(PolicySyntaxError) as caught:
        Policy.from_text(text, filename)
    return caught.value


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def rows(policy: Policy) -> list[tuple[str, ...]]:
    return [
        (rule.service, rule.argument, rule.source, rule.target, rule.action)
        for rule in policy.rules
    ]


# -- grammar ---------------------------------------------------------------------------------------
def test_blank_lines_and_comments_are_skipped_and_lines_keep_their_numbers() -> None:
    text = "# a comment\n\n   \n\t# indented comment\ntest.Svc * work mail allow\n"
    decision = decide(text, "work", "mail")
    assert decision.allowed
    assert decision.rule_location == "test.policy:5"


def test_fields_are_split_on_any_whitespace() -> None:
    text = "  test.Svc\t*   work \t mail\tallow   user=root  \n"
    [rule] = Policy.from_text(text).rules
    assert (rule.service, rule.argument, rule.source, rule.target, rule.action) == (
        "test.Svc",
        "*",
        "work",
        "mail",
        "allow",
    )
    assert rule.params == {"user": "root"}


def test_an_inline_comment_is_an_error() -> None:
    error = syntax_error("test.Svc * work mail allow # why\n")
    assert error.line == 1
    assert "'#' is not KEY=VALUE" in error.message


def test_params_are_separated_by_spaces_only() -> None:
    error = syntax_error("test.Svc * work mail allow,target=vault\n")
    assert "invalid action 'allow,target=vault'" in error.message


@pytest.mark.parametrize("action", ["Allow", "DENY", "permit", "drop"])
def test_actions_are_case_sensitive_words(action: str) -> None:
    assert f"invalid action {action!r}" in syntax_error(f"test.Svc * work mail {action}\n").message


@pytest.mark.parametrize("service", ["qubes.Gpg", "a", "A-z_0.9", "my-Service_2.x"])
def test_service_names_use_letters_digits_dot_underscore_dash(service: str) -> None:
    [rule] = Policy.from_text(f"{service} * work mail allow\n").rules
    assert rule.service == service


@pytest.mark.parametrize("service", ["test+Svc", "test/Svc", "test.*", "tést", "a:b"])
def test_other_characters_in_a_service_are_errors(service: str) -> None:
    assert "invalid characters" in syntax_error(f"{service} * work mail allow\n").message


@pytest.mark.parametrize("argument", ["*", "+", "+a", "+build-fedora", "+a.b_c-D+9"])
def test_argument_forms(argument: str) -> None:
    [rule] = Policy.from_text(f"test.Svc {argument} work mail allow\n").rules
    assert rule.argument == argument


def test_service_matches_by_equality_or_star_without_globbing() -> None:
    text = "test.Svc * work mail allow\n"
    assert matched(text, "work", "mail")
    assert not matched(text, "work", "mail", service="test.Sv")
    assert not matched(text, "work", "mail", service="test.SvcX")
    assert not matched(text, "work", "mail", service="test.svc")
    assert matched("* * work mail allow\n", "work", "mail", service="any.Thing", argument="x")


def test_argument_matches_by_equality_or_star() -> None:
    text = "test.Svc +a work mail allow\n"
    assert matched(text, "work", "mail", argument="a")
    assert not matched(text, "work", "mail", argument="ab")
    assert not matched(text, "work", "mail", argument="A")
    assert not matched(text, "work", "mail")
    star = "test.Svc * work mail allow\n"
    assert matched(star, "work", "mail", argument="anything")
    assert matched(star, "work", "mail")


def test_a_call_without_argument_is_matched_as_plus() -> None:
    text = "test.Svc + work mail allow\n"
    assert matched(text, "work", "mail")
    assert not matched(text, "work", "mail", argument="x")


# -- tokens: source column -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("token", "matching", "not_matching"),
    [
        ("work", ["work"], ["mail", "dom0"]),
        (f"uuid:{WORK_UUID}", ["work", f"uuid:{WORK_UUID}"], ["mail", "dom0"]),
        ("*", ["work", "dom0", "debian-12", "disp1234"], []),
        ("@anyvm", ["work", "debian-12", "disp1234", "standalone"], ["dom0"]),
        ("@adminvm", ["dom0"], ["work"]),
        ("dom0", ["dom0"], ["work"]),
        (f"uuid:{DOM0_UUID}", ["dom0"], ["work"]),
        ("@tag:office", ["work"], ["mail", "dom0"]),
        ("@tag:admin-tag", ["dom0"], ["work"]),
        ("@type:AppVM", ["work", "dvm"], ["debian-12", "dom0"]),
        ("@type:TemplateVM", ["debian-12"], ["work"]),
        ("@type:DispVM", ["disp1234"], ["work"]),
        ("@type:StandaloneVM", ["standalone"], ["work"]),
        ("@type:AdminVM", ["dom0"], ["work"]),
        ("@dispvm:dvm", [], ["work", "dvm", "disp1234"]),  # valid, never matches a source
        ("@dispvm:@tag:disp", [], ["work", "dvm", "disp1234"]),
        # a name Qubes does not know is valid; it matches only a source of that very name
        ("ghost", ["ghost"], ["work"]),
    ],
)
def test_source_tokens(token: str, matching: list[str], not_matching: list[str]) -> None:
    text = f"test.Svc * {token} @anyvm deny\n"
    for source in matching:
        assert matched(text, source, "mail"), source
    for source in not_matching:
        assert not matched(text, source, "mail"), source


@pytest.mark.parametrize(
    "token",
    [
        "@default",
        "@dispvm",
        "@something",
        "@tag:",
        "@type:",
        "@dispvm:",
        "@dispvm:@tag:",
        "@tag:@x",
    ],
)
def test_invalid_source_tokens(token: str) -> None:
    error = syntax_error(f"test.Svc * {token} @anyvm allow\n")
    assert error.message.startswith(f"invalid source token {token!r}")


# -- tokens: target column -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("token", "matching", "not_matching"),
    [
        ("mail", ["mail"], ["vault", "", "@default"]),
        (f"uuid:{VAULT_UUID}", ["vault", f"uuid:{VAULT_UUID}"], ["mail"]),
        ("*", ["mail", "dom0", "@adminvm", "", "@default", "@dispvm", "@dispvm:dvm"], []),
        ("@anyvm", ["mail", "", "@default", "@dispvm", "@dispvm:dvm"], ["dom0", "@adminvm"]),
        ("@adminvm", ["dom0", "@adminvm", f"uuid:{DOM0_UUID}"], ["mail", ""]),
        ("dom0", ["dom0", "@adminvm"], ["mail", ""]),
        ("@default", ["", "@default", "ghost", f"uuid:{DOM0_UUID[:-1]}9"], ["mail", "@dispvm"]),
        ("@tag:secret", ["vault"], ["mail", "@default"]),
        ("@tag:admin-tag", ["dom0"], ["@adminvm"]),  # tags and types match named qubes only
        ("@type:TemplateVM", ["debian-12"], ["mail"]),
        ("@type:AdminVM", ["dom0"], ["@adminvm"]),
        ("@dispvm", ["@dispvm"], ["@dispvm:dvm", "dvm", ""]),
        ("@dispvm:dvm", ["@dispvm:dvm", "@dispvm"], ["dvm", "@dispvm:dvm-plain"]),
        ("@dispvm:@tag:disp", ["@dispvm:dvm", "@dispvm"], ["dvm", "@dispvm:dvm-plain"]),
        ("ghost", [], ["", "ghost", "mail"]),
    ],
)
def test_target_tokens(token: str, matching: list[str], not_matching: list[str]) -> None:
    text = f"test.Svc * work {token} deny\n"
    for target in matching:
        assert matched(text, "work", target), target
    for target in not_matching:
        assert not matched(text, "work", target), target


def test_dispvm_template_tokens_match_a_dispvm_request_through_the_default_dispvm() -> None:
    named = "test.Svc * @anyvm @dispvm:dvm deny\n"
    assert matched(named, "work", "@dispvm")  # work's default_dispvm is dvm
    assert not matched(named, "plain", "@dispvm")  # plain's is dvm-plain
    assert not matched(named, "nodisp", "@dispvm")  # nodisp has none
    tagged = "test.Svc * @anyvm @dispvm:@tag:disp deny\n"
    assert matched(tagged, "work", "@dispvm")
    assert not matched(tagged, "plain", "@dispvm")  # dvm-plain has no tag disp
    assert not matched(tagged, "nodisp", "@dispvm")


@pytest.mark.parametrize(
    "token", ["@something", "@tag:", "@type:", "@dispvm:", "@dispvm:@tag:", "@dispvm:@x"]
)
def test_invalid_target_tokens(token: str) -> None:
    error = syntax_error(f"test.Svc * work {token} deny\n")
    assert error.message.startswith(f"invalid target token {token!r}")


# -- tokens: target= and default_target= -----------------------------------------------------------
@pytest.mark.parametrize(
    ("redirect", "final"),
    [
        ("vault", "vault"),
        (f"uuid:{VAULT_UUID}", "vault"),
        ("@adminvm", "dom0"),
        ("dom0", "dom0"),
        (f"uuid:{DOM0_UUID}", "dom0"),
        ("@dispvm", "@dispvm:dvm"),  # work's default_dispvm
        ("@dispvm:dvm-plain", "@dispvm:dvm-plain"),
    ],
)
def test_redirect_tokens(redirect: str, final: str) -> None:
    decision = decide(f"test.Svc * work mail allow target={redirect}\n", "work", "mail")
    assert (decision.allowed, decision.target) == (True, final)


@pytest.mark.parametrize(
    "redirect",
    ["@anyvm", "*", "@default", "@tag:office", "@type:AppVM", "@dispvm:@tag:disp", "@other"],
)
@pytest.mark.parametrize("key", ["target", "default_target"])
def test_invalid_redirect_tokens(redirect: str, key: str) -> None:
    error = syntax_error(f"test.Svc * work mail ask {key}={redirect}\n")
    assert error.message.startswith(f"invalid {key}= token {redirect!r}")


@pytest.mark.parametrize("default", ["mail", f"uuid:{VAULT_UUID}", "dom0", "@adminvm", "@dispvm"])
def test_default_target_takes_redirect_tokens(default: str) -> None:
    [rule] = Policy.from_text(f"test.Svc * work @default ask default_target={default}\n").rules
    assert rule.params == {"default_target": default}


# -- tokens: what a caller may request -------------------------------------------------------------
@pytest.mark.parametrize(
    ("requested", "seen_as"),
    [
        ("mail", "mail"),
        (f"uuid:{VAULT_UUID}", "vault"),
        ("dom0", "@adminvm"),
        ("@adminvm", "@adminvm"),
        (f"uuid:{DOM0_UUID}", "@adminvm"),
        ("@default", "@default"),
        ("", "@default"),
        ("ghost", "@default"),  # an unknown qube is @default, not an error
        ("uuid:99999999-9999-9999-9999-999999999999", "@default"),
        ("@dispvm", "@dispvm"),
        ("@dispvm:dvm", "@dispvm:dvm"),
    ],
)
def test_targets_a_caller_may_request(requested: str, seen_as: str) -> None:
    # The first rule naming exactly `seen_as` decides; the catch-all after it shows a miss.
    text = f"test.Svc * work {seen_as} deny\ntest.Svc * work * deny\n"
    assert matched(text, "work", requested)


@pytest.mark.parametrize(
    "requested",
    ["@anyvm", "*", "@tag:office", "@type:AppVM", "@dispvm:@tag:disp", "@something"],
)
def test_requests_for_patterns_are_denied_outright(requested: str) -> None:
    decision = decide("test.Svc * @anyvm * allow target=mail\n", "work", requested)
    assert (decision.allowed, decision.rule) == (False, None)
    assert "cannot ask for" in decision.reason


@pytest.mark.parametrize("requested", ["@dispvm:mail", "@dispvm:ghost"])
def test_a_dispvm_request_needs_a_template_for_disposables(requested: str) -> None:
    decision = decide("test.Svc * @anyvm * allow\n", "work", requested)
    assert (decision.allowed, decision.rule) == (False, None)
    assert "is not a template for disposables" in decision.reason


# -- actions and parameters ------------------------------------------------------------------------
def test_allow_defaults() -> None:
    decision = decide("test.Svc * work mail allow\n", "work", "mail")
    assert (decision.allowed, decision.target, decision.user) == (True, "mail", None)
    assert (decision.notify, decision.autostart) == (False, True)
    assert decision.reason == "allowed by policy test.policy:1"


def test_allow_parameters() -> None:
    text = "test.Svc * work mail allow user=root notify=yes autostart=no\n"
    decision = decide(text, "work", "mail")
    assert (decision.allowed, decision.user, decision.notify, decision.autostart) == (
        True,
        "root",
        True,
        False,
    )


def test_deny_notifies_unless_told_not_to() -> None:
    assert decide("test.Svc * work mail deny\n", "work", "mail").notify
    assert not decide("test.Svc * work mail deny notify=no\n", "work", "mail").notify


@pytest.mark.parametrize(
    ("action", "key", "valid"),
    [
        ("allow", "target", True),
        ("allow", "user", True),
        ("allow", "notify", True),
        ("allow", "autostart", True),
        ("allow", "default_target", False),
        ("ask", "target", True),
        ("ask", "default_target", True),
        ("ask", "user", True),
        ("ask", "notify", True),
        ("ask", "autostart", True),
        ("deny", "notify", True),
        ("deny", "target", False),
        ("deny", "user", False),
        ("deny", "autostart", False),
        ("deny", "default_target", False),
        ("allow", "colour", False),
        ("ask", "colour", False),
        ("deny", "colour", False),
    ],
)
def test_parameters_valid_for_each_action(action: str, key: str, valid: bool) -> None:
    value = "yes" if key in ("notify", "autostart") else "vault"
    text = f"test.Svc * work mail {action} {key}={value}\n"
    if valid:
        [rule] = Policy.from_text(text).rules
        assert rule.params == {key: value}
    else:
        message = syntax_error(text).message
        assert message == f"parameter {key!r} is not valid for action {action!r}"


# -- parse errors: each one of the reference, as FILE:LINE: message --------------------------------
@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("test.Svc", "wrong number of fields: 1"),
        ("test.Svc * work mail", "wrong number of fields: 4"),
        ("test.Svc * work mail Allow", "invalid action 'Allow'"),
        ("test/Svc * work mail allow", "invalid characters '/' in service"),
        ("test+Svc * work mail allow", "invalid characters '+' in service"),
        ("test.Svc +a/b work mail allow", "invalid characters '/' in argument"),
        ("test.Svc arg work mail allow", "argument 'arg' must be '*' or start with '+'"),
        ("* +arg work mail allow", "a '*' service takes only a '*' argument"),
        ("* + work mail allow", "a '*' service takes only a '*' argument"),
        ("test.Svc * @default mail allow", "invalid source token '@default'"),
        ("test.Svc * @dispvm mail allow", "invalid source token '@dispvm'"),
        ("test.Svc * @x mail allow", "invalid source token '@x'"),
        ("test.Svc * work @x allow", "invalid target token '@x'"),
        ("test.Svc * work mail allow target=@anyvm", "invalid target= token '@anyvm'"),
        ("test.Svc * work mail allow target=*", "invalid target= token '*'"),
        ("test.Svc * work mail allow target=@default", "invalid target= token '@default'"),
        ("test.Svc * work mail allow target=@tag:x", "invalid target= token '@tag:x'"),
        ("test.Svc * work mail allow target=@type:AppVM", "invalid target= token '@type:AppVM'"),
        ("test.Svc * @tag: mail allow", "empty @tag: token"),
        ("test.Svc * work @type: allow", "empty @type: token"),
        ("test.Svc * work @dispvm: allow", "empty @dispvm: token"),
        ("test.Svc * work mail allow target=", "empty target="),
        ("test.Svc * work mail ask default_target=", "empty default_target="),
        ("test.Svc * work mail allow notify", "parameter 'notify' is not KEY=VALUE"),
        ("test.Svc * work mail allow user=a user=b", "parameter 'user' given twice"),
        ("test.Svc * work mail allow notify=maybe", "notify= must be 'yes' or 'no'"),
        ("test.Svc * work mail allow autostart=1", "autostart= must be 'yes' or 'no'"),
        ("test.Svc * work mail deny notify=Yes", "notify= must be 'yes' or 'no'"),
        ("test.Svc * work mail deny target=mail", "'target' is not valid for action 'deny'"),
        ("test.Svc * work mail allow default_target=mail", "'default_target' is not valid"),
        ("test.Svc * work mail allow colour=red", "'colour' is not valid for action 'allow'"),
        ("test.Svc * work @default allow", "allow to @default needs a target="),
        ("!unknown x", "invalid directive '!unknown'"),
        ("!include", "!include takes 1 parameter(s), not 0"),
        ("!include a b", "!include takes 1 parameter(s), not 2"),
        ("!include-dir", "!include-dir takes 1 parameter(s), not 0"),
        ("!include-service test.Svc +a", "!include-service takes 3 parameter(s), not 2"),
        ("!include-service test+Svc * file", "invalid characters '+' in service"),
        ("!include-service test.Svc arg file", "must be '*' or start with '+'"),
        ("!compat-4.0 now", "!compat-4.0 takes 0 parameter(s), not 1"),
    ],
)
def test_parse_errors_name_file_and_line(line: str, fragment: str) -> None:
    error = syntax_error(f"# line one\n{line}\n", "20-test.policy")
    assert (error.file, error.line) == ("20-test.policy", 2)
    assert str(error) == f"20-test.policy:2: {error.message}"
    assert fragment in error.message


@pytest.mark.parametrize(
    "line",
    [
        "test.Svc * work @default ask",
        "test.Svc * work @default deny",
        "test.Svc * work @default allow target=mail",
        "test.Svc * @anyvm @anyvm ask default_target=@dispvm autostart=no",
        "test.Svc * work mail allow user= ",  # an empty user= means the default user
    ],
)
def test_lines_close_to_errors_are_valid(line: str) -> None:
    assert len(Policy.from_text(f"{line}\n").rules) == 1


def test_the_first_error_is_raised() -> None:
    error = syntax_error("test.Svc * work mail allow\nbad line\nworse\n")
    assert error.line == 2
    assert error.message.startswith("wrong number of fields: 2")


# -- evaluation ------------------------------------------------------------------------------------
def test_the_first_matching_rule_wins() -> None:
    deny_first = "test.Svc * work mail deny\ntest.Svc * work mail allow\n"
    decision = decide(deny_first, "work", "mail")
    assert (decision.allowed, decision.rule_location) == (False, "test.policy:1")
    allow_first = "test.Svc * work @anyvm allow\ntest.Svc * work mail deny\n"
    assert decide(allow_first, "work", "mail").allowed


def test_a_deny_rule_says_where_it_is() -> None:
    decision = decide(
        "other.Svc * @anyvm @anyvm allow\ntest.Svc * work mail deny\n", "work", "mail"
    )
    assert decision.reason == "denied by policy test.policy:2"
    assert decision.rule == Rule("test.Svc", "*", "work", "mail", "deny", {}, "test.policy", 2)
    assert decision.rule_location == decision.rule.location == "test.policy:2"


def test_no_matching_rule_denies() -> None:
    decision = decide("test.Svc * work vault allow\n", "work", "mail")
    assert (decision.allowed, decision.rule, decision.rule_location) == (False, None, "")
    assert decision.reason == "no matching rule found"
    assert decision.notify
    unknown = decide("test.Svc * work vault allow\n", "work", "ghost")
    assert (unknown.requested_target, unknown.requested_target_type) == ("@default", "keyword")
    assert not Policy([]).evaluate(Request("work", "mail", "test.Svc"), SYSTEM).allowed


def test_a_redirect_matches_what_was_asked_and_changes_only_the_target() -> None:
    text = "test.Svc * work dom0 allow target=vault\n"
    decision = decide(text, "work", "dom0")
    assert (decision.allowed, decision.target) == (True, "vault")
    assert (decision.requested_target, decision.requested_target_type) == ("dom0", "name")
    assert not matched(text, "work", "vault")  # asking for the redirect target is another call


@pytest.mark.parametrize(
    ("requested", "passed_on", "kind"),
    [
        ("mail", "mail", "name"),
        ("dom0", "dom0", "name"),
        (f"uuid:{VAULT_UUID}", f"uuid:{VAULT_UUID}", "name"),
        ("@adminvm", "@adminvm", "keyword"),
        ("", "@default", "keyword"),
        ("ghost", "@default", "keyword"),
        ("@dispvm", "@dispvm", "keyword"),
        ("@dispvm:dvm", "@dispvm:dvm", "keyword"),
        ("@anyvm", "@anyvm", "keyword"),
    ],
)
def test_requested_target_and_its_type(requested: str, passed_on: str, kind: str) -> None:
    decision = decide("test.Svc * work * deny\n", "work", requested)
    assert (decision.requested_target, decision.requested_target_type) == (passed_on, kind)


def test_dom0_requested_is_adminvm() -> None:
    text = "test.Svc * work @adminvm allow\n"
    by_name, by_keyword = decide(text, "work", "dom0"), decide(text, "work", "@adminvm")
    assert (by_name.allowed, by_name.target) == (True, "dom0")
    assert (by_keyword.allowed, by_keyword.target) == (True, "dom0")
    assert not decide("test.Svc * work @anyvm allow\n", "work", "dom0").rule


def test_allow_resolving_to_default_without_target_is_denied() -> None:
    decision = decide("test.Svc * work * allow\n", "work", "")
    assert (decision.allowed, decision.rule_location) == (False, "test.policy:1")
    assert "@default" in decision.reason
    assert "test.policy:1" in decision.reason


def test_default_with_a_target_goes_there() -> None:
    decision = decide("test.Svc * work @default allow target=mail\n", "work", "")
    assert (decision.allowed, decision.target) == (True, "mail")


def test_dispvm_resolves_to_the_default_dispvm_of_the_source() -> None:
    text = "test.Svc * @anyvm @dispvm allow\n"
    assert decide(text, "work", "@dispvm").target == "@dispvm:dvm"
    assert decide(text, "plain", "@dispvm").target == "@dispvm:dvm-plain"


def test_dispvm_from_a_source_without_default_dispvm_is_denied() -> None:
    decision = decide("test.Svc * @anyvm @dispvm allow\n", "nodisp", "@dispvm")
    assert (decision.allowed, decision.rule_location) == (False, "test.policy:1")
    assert "nodisp asks for @dispvm but has no default_dispvm" in decision.reason
    redirected = decide("test.Svc * nodisp mail allow target=@dispvm\n", "nodisp", "mail")
    assert not redirected.allowed


def test_a_named_disposable_is_allowed_as_asked() -> None:
    decision = decide("test.Svc * work @dispvm:dvm-plain allow\n", "work", "@dispvm:dvm-plain")
    assert (decision.allowed, decision.target) == (True, "@dispvm:dvm-plain")


def test_a_redirect_to_a_non_template_disposable_is_denied() -> None:
    decision = decide("test.Svc * work mail allow target=@dispvm:mail\n", "work", "mail")
    assert not decision.allowed
    assert "'mail' is not a template for disposables" in decision.reason


def test_a_redirect_to_a_qube_that_does_not_exist_is_denied() -> None:
    decision = decide("test.Svc * work mail allow target=ghost\n", "work", "mail")
    assert not decision.allowed
    assert "ghost" in decision.reason


def test_autostart() -> None:
    halted = decide("test.Svc * work vault allow\n", "work", "vault")
    assert (halted.allowed, halted.autostart) == (True, True)  # started on demand
    refused = decide("test.Svc * work vault allow autostart=no\n", "work", "vault")
    assert not refused.allowed
    assert "autostart=no" in refused.reason
    running = decide("test.Svc * work mail allow autostart=no\n", "work", "mail")
    assert (running.allowed, running.autostart) == (True, False)
    assert decide("test.Svc * work dom0 allow autostart=no\n", "work", "dom0").allowed
    disposable = decide("test.Svc * work @dispvm allow autostart=no\n", "work", "@dispvm")
    assert not disposable.allowed  # a new disposable always has to be started
    redirected = decide("test.Svc * work mail allow target=vault autostart=no\n", "work", "mail")
    assert not redirected.allowed  # the final target counts


# qrexec/policy/parser.py, Allow.evaluate: nothing compares the final target with the source;
# AllowResolution.execute refuses a loopback only when the call is about to run.
@pytest.mark.parametrize(
    ("text", "source", "target"),
    [
        ("test.Svc * work @anyvm allow\n", "work", "work"),
        ("test.Svc * work mail allow target=work\n", "work", "mail"),
        ("test.Svc * work @default allow target=work\n", "work", ""),
        ("test.Svc * dom0 dom0 allow\n", "dom0", "dom0"),
    ],
)
def test_a_call_to_the_caller_itself_is_allowed_by_evaluation_and_refused_when_run(
    text: str, source: str, target: str
) -> None:
    decision = decide(text, source, target)
    assert (decision.allowed, decision.target, decision.rule_location) == (
        True,
        source,
        "test.policy:1",
    )
    request = Request(source, target, "test.Svc")
    assert qrexec_policy.refusal_when_run(request, decision) == (
        "loopback qrexec connection not supported"
    )
    assert policy_exec(text, source, target) == (1, "result=deny\n")


def test_only_a_loopback_is_refused_when_run() -> None:
    allowed = decide("test.Svc * work mail allow\n", "work", "mail")
    assert qrexec_policy.refusal_when_run(Request("work", "mail", "test.Svc"), allowed) is None
    denied = decide("test.Svc * work work deny\n", "work", "work")
    assert qrexec_policy.refusal_when_run(Request("work", "work", "test.Svc"), denied) is None


def test_ask_is_refused_when_no_person_answers() -> None:
    decision = decide("test.Svc * work mail ask default_target=mail\n", "work", "mail")
    assert (decision.allowed, decision.target, decision.rule_location) == (
        False,
        None,
        "test.policy:1",
    )
    assert decision.reason == "ask action refused: no user to ask (test.policy:1)"


@pytest.mark.parametrize(
    "text",
    [
        "test.Svc * work vault ask autostart=no\n",  # the only choice is halted
        "test.Svc * work @default ask\ntest.Svc * work @anyvm deny\n",  # nothing allowed at all
        # an earlier deny takes away what a later rule allows
        "test.Svc * work mail deny\ntest.Svc * work @default ask\ntest.Svc * work mail allow\n",
    ],
)
def test_ask_with_nothing_to_choose_from(text: str) -> None:
    target = "vault" if "vault" in text else ""
    decision = decide(text, "work", target)
    assert not decision.allowed
    assert decision.reason.startswith("ask action refused: no target to choose from")


def test_ask_choices_come_from_the_rules_for_the_call() -> None:
    text = "test.Svc * work @default ask\ntest.Svc * work mail allow\n"
    assert decide(text, "work", "").reason.startswith("ask action refused: no user to ask")


def test_sources_are_found_by_name_or_uuid() -> None:
    text = "test.Svc * work mail allow\n"
    assert decide(text, f"uuid:{WORK_UUID}", "mail").allowed


# qrexec/policy/parser.py: Request does not look the source up, and only some tokens do
# (TagVM.match, TypeVM.match and match_strings with a uuid need it in system_info; AnyVM.match,
# WildcardVM.match and a name compared as a string do not).
@pytest.mark.parametrize(
    ("text", "target", "final"),
    [
        ("test.Svc * * * allow target=mail\n", "mail", "mail"),
        ("test.Svc * @anyvm @anyvm allow\n", "mail", "mail"),
        ("test.Svc * ghost mail allow\n", "mail", "mail"),
        ("test.Svc * @anyvm @adminvm allow\n", "dom0", "dom0"),
        ("test.Svc * @anyvm @default allow target=mail\n", "", "mail"),
        ("test.Svc * @tag:office mail allow\n", "mail", None),
        ("test.Svc * @type:AppVM mail allow\n", "mail", None),
        (f"test.Svc * uuid:{WORK_UUID} mail allow\n", "mail", None),
        ("test.Svc * @anyvm @dispvm allow\n", "@dispvm", None),  # no default_dispvm to use
        ("test.Svc * @anyvm mail ask default_target=mail\n", "mail", None),
    ],
)
def test_an_unknown_source_is_matched_as_qubes_matches_it(
    text: str, target: str, final: str | None
) -> None:
    decision = decide(text, "ghost", target)
    assert (decision.allowed, decision.target) == (final is not None, final)


# -- targets as callers spell them -----------------------------------------------------------------
# qrexec/policy/parser.py, Request.__init__ (an empty target is @default) and
# IntendedTarget.verify (a target that names no qube is @default: '$' keywords are such names,
# since qrexec-client-vm, not the policy, turns '$' into '@').
@pytest.mark.parametrize(
    ("text", "target", "final", "requested"),
    [
        ("test.Svc * work @default allow target=mail\n", "", "mail", "@default"),
        ("test.Svc * work @default allow target=mail\n", "@default", "mail", "@default"),
        ("test.Svc * work @default allow target=mail\n", "$default", "mail", "@default"),
        ("test.Svc * work @default allow target=mail\n", "$dispvm", "mail", "@default"),
        ("test.Svc * work @dispvm allow\n", "$dispvm", None, "@default"),
        ("test.Svc * work @dispvm:dvm allow\n", "$dispvm:dvm", None, "@default"),
        ("test.Svc * work @adminvm allow\n", "$adminvm", None, "@default"),
        ("test.Svc * work @anyvm allow\n", "", None, "@default"),  # allow to @default: nowhere
    ],
)
def test_empty_and_dollar_targets(
    text: str, target: str, final: str | None, requested: str
) -> None:
    decision = decide(text, "work", target)
    assert (decision.allowed, decision.target) == (final is not None, final)
    assert (decision.requested_target, decision.requested_target_type) == (requested, "keyword")


# -- halted qubes and autostart=no -----------------------------------------------------------------
# qrexec/policy/parser.py, ActionType.allow_no_autostart: dom0 always, a disposable never, a qube
# only when its power state is Running; Ask.evaluate drops the choices it rules out.
@pytest.mark.parametrize(
    ("text", "target", "final"),
    [
        ("test.Svc * work vault allow autostart=no\n", "vault", None),
        ("test.Svc * work vault allow autostart=no\n", f"uuid:{VAULT_UUID}", None),
        ("test.Svc * work @default allow target=vault autostart=no\n", "", None),
        ("test.Svc * work mail allow target=vault autostart=no\n", "mail", None),
        ("test.Svc * work @tag:secret allow autostart=no\n", "vault", None),
        ("test.Svc * work @anyvm allow autostart=no\n", "@dispvm:dvm", None),
        ("test.Svc * work @dispvm:dvm allow autostart=no\n", "@dispvm", None),
        ("test.Svc * work vault ask autostart=no\ntest.Svc * work vault allow\n", "vault", None),
        ("test.Svc * work vault allow autostart=yes\n", "vault", "vault"),
        ("test.Svc * work vault allow\n", "vault", "vault"),
        ("test.Svc * work mail allow target=vault\n", "mail", "vault"),
        ("test.Svc * work @default allow target=mail autostart=no\n", "", "mail"),
        ("test.Svc * work dom0 allow autostart=no\n", "@adminvm", "dom0"),
    ],
)
def test_halted_targets_with_autostart_off(text: str, target: str, final: str | None) -> None:
    decision = decide(text, "work", target)
    assert (decision.allowed, decision.target) == (final is not None, final)


def test_the_three_argument_form_prints_the_answer_qrexec_daemon_reads() -> None:
    # qrexec/policy/parser.py, AllowResolution.execute: the lines of an allow, in this order.
    assert policy_exec("test.Svc * work @default allow target=vault\n", "work", "") == (
        0,
        f"user=DEFAULT\nresult=allow\ntarget=vault\ntarget_uuid=uuid:{VAULT_UUID}\n"
        "autostart=True\nrequested_target=@default\n",
    )
    assert policy_exec("test.Svc * work dom0 allow user=root autostart=no\n", "work", "dom0") == (
        0,
        "user=root\nresult=allow\ntarget=dom0\nautostart=False\nrequested_target=dom0\n",
    )
    assert policy_exec("test.Svc * work mail deny\n", "work", "mail") == (1, "result=deny\n")


# -- the system ------------------------------------------------------------------------------------
def test_system_lookup() -> None:
    assert SYSTEM.get("work") == SYSTEM.get(f"uuid:{WORK_UUID}")
    assert SYSTEM.get(f"uuid:{DOM0_UUID}") == SYSTEM.get("dom0")
    assert SYSTEM.get("ghost") is None
    assert SYSTEM.get("uuid:") is None
    assert {qube.name for qube in SYSTEM} >= {"dom0", "work", "vault"}


@pytest.mark.parametrize(
    "qubes",
    [
        [Qube("work", "AppVM")],  # no dom0
        [Qube("dom0", "AppVM")],
        [Qube("dom0", "AdminVM"), Qube("admin", "AdminVM")],
        [Qube("dom0", "AdminVM"), Qube("work", "AppVM"), Qube("work", "TemplateVM")],
    ],
)
def test_system_refuses_an_impossible_set_of_qubes(qubes: list[Qube]) -> None:
    with pytest.raises(ValueError):
        System(qubes)


# -- policy files ----------------------------------------------------------------------------------
def load(tmp_path: Path) -> Policy:
    return Policy.load(
        [str(tmp_path / "run"), str(tmp_path / "etc")], str(tmp_path / "qubes-rpc-policy")
    )


def test_files_are_read_in_codepoint_order_and_run_overrides_etc(tmp_path: Path) -> None:
    run, etc = tmp_path / "run", tmp_path / "etc"
    for name in ("90-default", "4-late", "30_under", "35-compat", "30-user"):
        write(etc / f"{name}.policy", f"test.Svc +{name} work mail allow\n")
    write(run / "30-user.policy", "test.Svc +from-run work mail allow\n")
    write(run / "31-run-only.policy", "test.Svc +run-only work mail allow\n")
    assert [rule.argument for rule in load(tmp_path).rules] == [
        "+from-run",
        "+30_under",
        "+run-only",
        "+35-compat",
        "+4-late",
        "+90-default",
    ]
    assert load(tmp_path).rules[0].location == f"{run}/30-user.policy:1"


def test_only_regular_visible_policy_files_are_read(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    write(etc / "20-good.policy", "test.Svc * work mail allow\n")
    for ignored in (".20-hidden.policy", "20-other.txt", "20-x.policy.rpmnew", "20-x.policyx"):
        write(etc / ignored, "garbage\n")
    write(etc / "sub" / "20-nested.policy", "garbage\n")
    write(etc / "folder.policy" / "20-in-folder.policy", "garbage\n")
    write(etc / ".30-Hidden-Invalid.policy", "garbage\n")  # hidden: its name is not checked
    assert [rule.location for rule in load(tmp_path).rules] == [f"{etc}/20-good.policy:1"]


@pytest.mark.parametrize("name", ["30-User.policy", "30-a+b.policy", "30 user.policy"])
def test_an_invalid_file_name_fails_the_whole_policy(tmp_path: Path, name: str) -> None:
    write(tmp_path / "etc" / "20-good.policy", "test.Svc * work mail allow\n")
    write(tmp_path / "etc" / name, "test.Svc * work mail allow\n")
    with pytest.raises(PolicySyntaxError) as error:
        load(tmp_path)
    assert (error.value.file, error.value.line) == (str(tmp_path / "etc" / name), 0)
    assert "invalid policy file name" in error.value.message


def test_a_syntax_error_in_any_file_fails_the_whole_policy(tmp_path: Path) -> None:
    write(tmp_path / "etc" / "20-good.policy", "test.Svc * work mail allow\n")
    write(tmp_path / "etc" / "90-bad.policy", "test.Svc * work mail allow\nbroken line\n")
    with pytest.raises(PolicySyntaxError) as error:
        load(tmp_path)
    assert str(error.value).startswith(f"{tmp_path}/etc/90-bad.policy:2: wrong number of fields")


def test_missing_policy_directories_are_empty(tmp_path: Path) -> None:
    policy = load(tmp_path)
    assert policy.rules == []
    decision = policy.evaluate(Request("work", "mail", "test.Svc"), SYSTEM)
    assert decision.reason == "no matching rule found"


def test_replacing_checks_a_file_with_the_whole_policy(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    write(etc / "20-a.policy", "test.Svc +a work mail allow\n")
    write(etc / "30-b.policy", "!include 20-a.policy\n")
    dirs, legacy = [str(etc)], str(tmp_path / "legacy")
    new = str(etc / "25-new.policy")
    added = Policy.load(dirs, legacy, replacing={new: "test.Svc +n w m deny\n"})
    assert [rule.argument for rule in added.rules] == ["+a", "+n", "+a"]
    with pytest.raises(PolicySyntaxError, match=r"25-new\.policy:1: wrong number of fields"):
        Policy.load(dirs, legacy, replacing={new: "broken\n"})
    with pytest.raises(PolicySyntaxError, match=r"30-b\.policy:1: not a file: .*to be removed"):
        Policy.load(dirs, legacy, replacing={str(etc / "20-a.policy"): None})
    with pytest.raises(PolicySyntaxError, match="invalid policy file name"):
        Policy.load(dirs, legacy, replacing={str(etc / "25-New.policy"): ""})


def test_replacing_a_file_hidden_by_run_changes_nothing(tmp_path: Path) -> None:
    write(tmp_path / "run" / "20-a.policy", "test.Svc +run work mail allow\n")
    write(tmp_path / "etc" / "20-a.policy", "test.Svc +etc work mail allow\n")
    dirs = [str(tmp_path / "run"), str(tmp_path / "etc")]
    replacing = {str(tmp_path / "etc" / "20-a.policy"): "broken\n"}
    policy = Policy.load(dirs, str(tmp_path / "legacy"), replacing=replacing)
    assert [rule.argument for rule in policy.rules] == ["+run"]


# -- directives ------------------------------------------------------------------------------------
def test_include_puts_rules_where_it_stands(tmp_path: Path) -> None:
    included = write(tmp_path / "elsewhere" / "one.policy", "test.Svc +included work mail allow\n")
    before, after = "test.Svc +before work mail allow", "test.Svc +after work mail allow"
    write(tmp_path / "etc" / "20-top.policy", f"{before}\n!include {included}\n{after}\n")
    policy = load(tmp_path)
    assert [rule.argument for rule in policy.rules] == ["+before", "+included", "+after"]
    assert policy.rules[1].location == f"{included}:1"


def test_relative_paths_resolve_against_the_top_level_files_folder(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    write(etc / "20-top.policy", "!include inc/one.inc\n")
    # one.inc is in inc/, yet its own relative path is read from etc/ (the top-level folder).
    write(etc / "inc" / "one.inc", "!include inc/two.inc\ntest.Svc +one work mail allow\n")
    write(etc / "inc" / "two.inc", "test.Svc +two work mail allow\n")
    assert [rule.argument for rule in load(tmp_path).rules] == ["+two", "+one"]


def test_include_dir_reads_its_policy_files_in_order(tmp_path: Path) -> None:
    parts = tmp_path / "etc" / "parts"
    write(parts / "b.policy", "test.Svc +b work mail allow\n")
    write(parts / "a.policy", "test.Svc +a work mail allow\n")
    write(parts / ".hidden.policy", "garbage\n")
    write(parts / "c.txt", "garbage\n")
    write(parts / "sub" / "d.policy", "garbage\n")
    write(tmp_path / "etc" / "20-top.policy", "!include-dir parts\n")
    assert [rule.location for rule in load(tmp_path).rules] == [
        f"{parts}/a.policy:1",
        f"{parts}/b.policy:1",
    ]


def test_include_dir_with_an_invalid_file_name_fails(tmp_path: Path) -> None:
    write(tmp_path / "etc" / "parts" / "Bad.policy", "test.Svc * work mail allow\n")
    write(tmp_path / "etc" / "20-top.policy", "!include-dir parts\n")
    with pytest.raises(PolicySyntaxError, match=r"20-top.policy:1: .*invalid policy file name"):
        load(tmp_path)


def test_include_service_reads_legacy_syntax_for_one_service(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    write(etc / "legacy" / "svc", "$tag:office mail allow,user=root\n$include:legacy/more\n")
    write(etc / "legacy" / "more", "$anyvm $anyvm deny\n")
    write(
        etc / "20-top.policy",
        "!include-service test.Svc +legacy legacy/svc\ntest.Svc * work vault allow\n",
    )
    policy = load(tmp_path)
    assert rows(policy) == [
        ("test.Svc", "+legacy", "@tag:office", "mail", "allow"),
        ("test.Svc", "+legacy", "@anyvm", "@anyvm", "deny"),  # no implicit deny is added
        ("test.Svc", "*", "work", "vault", "allow"),
    ]
    assert policy.rules[0].params == {"user": "root"}
    assert policy.rules[1].location == f"{etc}/legacy/more:1"
    request = Request("work", "mail", "test.Svc", "legacy")
    assert policy.evaluate(request, SYSTEM).user == "root"


def test_compat_reads_legacy_files_per_service_with_implicit_denies(tmp_path: Path) -> None:
    legacy = tmp_path / "qubes-rpc-policy"
    write(legacy / "test.Svc+b", "work mail allow\n")
    write(legacy / "test.Svc+a", "$tag:office $default allow,target=mail,user=root\n")
    write(legacy / "test.Svc", "work vault allow\n")
    write(legacy / "other.Svc", "# comment\n\nwork mail allow\n")
    for ignored in (".hidden", "test.Svc+c.rpmnew", "test.Svc+d.rpmsave", "x.swp", "bad~name"):
        write(legacy / ignored, "garbage\n")
    write(legacy / "folder" / "test.Svc", "garbage\n")
    write(tmp_path / "etc" / "35-compat.policy", "!compat-4.0\n")
    write(tmp_path / "etc" / "90-default.policy", "test.Svc * work mail allow\n")
    policy = load(tmp_path)
    implicit = [("@anyvm", "@anyvm", "deny"), ("@anyvm", "@adminvm", "deny")]
    assert rows(policy) == [
        ("other.Svc", "*", "work", "mail", "allow"),
        ("test.Svc", "+a", "@tag:office", "@default", "allow"),
        *[("test.Svc", "+a", *row) for row in implicit],
        ("test.Svc", "+b", "work", "mail", "allow"),
        *[("test.Svc", "+b", *row) for row in implicit],
        ("test.Svc", "*", "work", "vault", "allow"),  # nothing is added after a generic file
        ("test.Svc", "*", "work", "mail", "allow"),
    ]
    assert [rule.location for rule in policy.rules[1:4]] == [
        f"{legacy}/test.Svc+a:1",
        f"{legacy}/test.Svc+a:0",
        f"{legacy}/test.Svc+a:0",
    ]

    def evaluate(source: str, target: str, argument: str = "") -> Decision:
        return policy.evaluate(Request(source, target, "test.Svc", argument), SYSTEM)

    assert (evaluate("work", "", "a").target, evaluate("work", "", "a").user) == ("mail", "root")
    assert evaluate("mail", "work", "b").rule_location == f"{legacy}/test.Svc+b:0"
    assert evaluate("mail", "dom0", "b").rule_location == f"{legacy}/test.Svc+b:0"
    # A call the generic file does not decide falls through to the rest of the policy.
    assert evaluate("work", "mail").rule_location == f"{tmp_path}/etc/90-default.policy:1"


def test_compat_reports_errors_in_legacy_files(tmp_path: Path) -> None:
    write(tmp_path / "qubes-rpc-policy" / "test.Svc", "work mail allow\nwork mail\n")
    write(tmp_path / "etc" / "35-compat.policy", "!compat-4.0\n")
    with pytest.raises(PolicySyntaxError) as error:
        load(tmp_path)
    assert (error.value.file, error.value.line) == (str(tmp_path / "qubes-rpc-policy/test.Svc"), 2)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("!include missing.policy\n", "not a file: "),
        ("!include-service test.Svc * missing\n", "not a file: "),
        ("!include-dir missing\n", "not a directory: "),
        ("!include 20-top.policy\n", "includes itself"),
    ],
)
def test_include_errors_name_the_directive(tmp_path: Path, text: str, fragment: str) -> None:
    top = write(tmp_path / "etc" / "20-top.policy", f"# first\n{text}")
    with pytest.raises(PolicySyntaxError) as error:
        load(tmp_path)
    assert (error.value.file, error.value.line) == (str(top), 2)
    assert fragment in error.value.message


def test_errors_in_an_included_file_name_that_file(tmp_path: Path) -> None:
    included = write(tmp_path / "etc" / "inc" / "a.inc", "\n\ntest.Svc * work mail nope\n")
    write(tmp_path / "etc" / "20-top.policy", "!include inc/a.inc\n")
    with pytest.raises(PolicySyntaxError) as error:
        load(tmp_path)
    assert (error.value.file, error.value.line) == (str(included), 3)


def test_mutual_includes_are_refused(tmp_path: Path) -> None:
    write(tmp_path / "etc" / "inc" / "a.inc", "!include inc/b.inc\n")
    write(tmp_path / "etc" / "inc" / "b.inc", "!include inc/a.inc\n")
    write(tmp_path / "etc" / "20-top.policy", "!include inc/a.inc\n")
    with pytest.raises(PolicySyntaxError, match=r"b.inc:1: .*includes itself"):
        load(tmp_path)


def test_from_text_resolves_directives_against_its_file_name_or_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "policy.d" / "inc" / "a.inc", "test.Svc +a work mail allow\n")
    by_folder = Policy.from_text("!include inc/a.inc\n", str(tmp_path / "policy.d" / "x.policy"))
    assert [rule.argument for rule in by_folder.rules] == ["+a"]
    monkeypatch.chdir(tmp_path / "policy.d")
    assert [rule.argument for rule in Policy.from_text("!include inc/a.inc\n").rules] == ["+a"]


def test_rules_is_a_copy() -> None:
    policy = Policy.from_text("test.Svc * work mail allow\n")
    policy.rules.clear()
    assert len(policy.rules) == 1


# -- lint ------------------------------------------------------------------------------------------
def test_lint_reports_every_error_of_every_file_on_its_own(tmp_path: Path) -> None:
    good = write(tmp_path / "good.policy", "test.Svc * work mail allow\n!include missing.policy\n")
    bad = write(
        tmp_path / "bad.policy",
        "one two\ntest.Svc * work mail allow\nx * z w nope\n!include\n!frobnicate\n",
    )
    errors = qrexec_policy.lint([str(good), str(bad)])
    assert [(error.file, error.line) for error in errors] == [
        (str(bad), 1),
        (str(bad), 3),
        (str(bad), 4),
        (str(bad), 5),
    ]
    assert qrexec_policy.lint([str(good)]) == []  # includes are not followed


def test_lint_reports_file_names_and_missing_files(tmp_path: Path) -> None:
    named = write(tmp_path / "30-User.policy", "test.Svc * work mail allow\n")
    missing = tmp_path / "missing.policy"
    errors = qrexec_policy.lint([str(named), str(missing)])
    assert [(error.file, error.line) for error in errors] == [(str(named), 0), (str(missing), 0)]
    assert "invalid policy file name" in errors[0].message
    assert "not a file" in errors[1].message


def test_lint_of_service_files_uses_the_legacy_syntax(tmp_path: Path) -> None:
    legacy = write(tmp_path / "svc", "$anyvm $anyvm deny\nwork mail allow,user=root\n")
    v5 = write(tmp_path / "v5", "test.Svc * work mail allow\n")
    assert qrexec_policy.lint([str(legacy)], service_files=True) == []
    assert [error.line for error in qrexec_policy.lint([str(v5)], service_files=True)] == [1]
    assert [error.line for error in qrexec_policy.lint([str(legacy)])] == [1, 2]


# -- the Salt formula's policy, for an env `fedora` (logs qube build-logs, net qube sys-net) -------
FORMULA = """\
qubesbuilder.LogReceived +build-fedora build-logs dom0 allow target=keys-fedora
qubes.Gpg * build-fedora keys-fedora allow
qubes.Gpg * build-fedora @default allow target=keys-fedora
qubes.Gpg * @anyvm keys-fedora deny
qubesbuilder.BuildLog * build-fedora dom0 allow target=build-logs
"""
WEBHOOKS = """\
qubesbuilder.TriggerBuild * sys-net build-fedora allow
qubesbuilder.ProcessGithubCommand * sys-net build-fedora allow
"""
FORMULA_SYSTEM = System(
    [
        Qube("dom0", "AdminVM"),
        Qube("build-fedora", "AppVM"),
        Qube("keys-fedora", "AppVM", running=False),
        Qube("build-logs", "AppVM"),
        Qube("sys-net", "AppVM"),
        Qube("build-other", "AppVM"),
    ]
)


@pytest.fixture
def formula(tmp_path: Path) -> Policy:
    etc, legacy = tmp_path / "etc", tmp_path / "qubes-rpc-policy"
    write(etc / "20-qubesbuilder.policy", FORMULA)
    write(etc / "20-qubesbuilder-webhook.policy", WEBHOOKS)
    write(etc / "35-compat.policy", "!compat-4.0\n")
    write(etc / "90-default.policy", "qubes.Filecopy * @anyvm @anyvm ask\n")
    for host in ("github.com", "yum.qubes-os.org"):  # the formula's legacy ssh proxy files
        write(legacy / f"local.ConnectSSH+{host}", "build-fedora sys-net allow\n")
    write(legacy / "local.ConnectSSH", "$anyvm $anyvm deny\n")
    assert qrexec_policy.lint(str(path) for path in etc.iterdir()) == []
    return Policy.load([str(tmp_path / "run"), str(etc)], str(legacy))


SSH_GITHUB = "qubes-rpc-policy/local.ConnectSSH+github.com"


@pytest.mark.parametrize(
    ("source", "target", "service", "expected", "where"),
    [
        # logs qube -> dom0, redirected to the keys qube (halted: started on demand)
        ("build-logs", "dom0", "qubesbuilder.LogReceived+build-fedora", "keys-fedora", "qb:1"),
        ("build-logs", "dom0", "qubesbuilder.LogReceived+build-other", None, ""),
        ("build-logs", "dom0", "qubesbuilder.LogReceived", None, ""),
        ("build-fedora", "dom0", "qubesbuilder.LogReceived+build-fedora", None, ""),
        ("build-logs", "keys-fedora", "qubesbuilder.LogReceived+build-fedora", None, ""),
        # split GPG: only build-fedora reaches keys-fedora, by name or as @default
        ("build-fedora", "keys-fedora", "qubes.Gpg", "keys-fedora", "qb:2"),
        ("build-fedora", "", "qubes.Gpg", "keys-fedora", "qb:3"),
        ("build-fedora", "@default", "qubes.Gpg", "keys-fedora", "qb:3"),
        ("build-other", "keys-fedora", "qubes.Gpg", None, "qb:4"),
        ("build-logs", "keys-fedora", "qubes.Gpg", None, "qb:4"),
        ("sys-net", "keys-fedora", "qubes.Gpg", None, "qb:4"),
        ("build-other", "", "qubes.Gpg", None, ""),
        # build logs: build-fedora -> dom0, redirected to the logs qube
        ("build-fedora", "dom0", "qubesbuilder.BuildLog", "build-logs", "qb:5"),
        ("build-fedora", "build-logs", "qubesbuilder.BuildLog", None, ""),
        ("build-other", "dom0", "qubesbuilder.BuildLog", None, ""),
        ("keys-fedora", "dom0", "qubesbuilder.BuildLog", None, ""),
        # webhooks: the net qube triggers builds
        ("sys-net", "build-fedora", "qubesbuilder.TriggerBuild+core-admin", "build-fedora", "wh:1"),
        ("sys-net", "build-fedora", "qubesbuilder.ProcessGithubCommand", "build-fedora", "wh:2"),
        ("build-other", "build-fedora", "qubesbuilder.TriggerBuild", None, ""),
        ("sys-net", "build-other", "qubesbuilder.TriggerBuild", None, ""),
        # ssh proxy, from the legacy files through !compat-4.0
        ("build-fedora", "sys-net", "local.ConnectSSH+github.com", "sys-net", "gh:1"),
        ("build-fedora", "sys-net", "local.ConnectSSH+yum.qubes-os.org", "sys-net", "yum:1"),
        ("build-fedora", "sys-net", "local.ConnectSSH+evil.example", None, "ssh:1"),
        ("build-fedora", "sys-net", "local.ConnectSSH", None, "ssh:1"),
        ("build-other", "sys-net", "local.ConnectSSH+github.com", None, "gh:0"),
        ("build-fedora", "dom0", "local.ConnectSSH+github.com", None, "gh:0"),
        ("build-fedora", "build-logs", "local.ConnectSSH+github.com", None, "gh:0"),
        # everything else: asked of nobody, or matched by nothing
        ("build-fedora", "build-logs", "qubes.Filecopy", None, "default:1"),
        ("keys-fedora", "build-logs", "qubesbuilder.BuildLog", None, ""),
    ],
)
def test_salt_formula_policy(
    formula: Policy,
    tmp_path: Path,
    source: str,
    target: str,
    service: str,
    expected: str | None,
    where: str,
) -> None:
    files = {
        "qb": "etc/20-qubesbuilder.policy",
        "wh": "etc/20-qubesbuilder-webhook.policy",
        "default": "etc/90-default.policy",
        "gh": SSH_GITHUB,
        "yum": "qubes-rpc-policy/local.ConnectSSH+yum.qubes-os.org",
        "ssh": "qubes-rpc-policy/local.ConnectSSH",
    }
    name, _sep, argument = service.partition("+")
    decision = formula.evaluate(Request(source, target, name, argument), FORMULA_SYSTEM)
    assert (decision.target if decision.allowed else None) == expected, decision.reason
    if where:
        key, line = where.split(":")
        assert decision.rule_location == f"{tmp_path}/{files[key]}:{line}"
    else:
        assert decision.reason == "no matching rule found"
    if expected:
        assert decision.autostart
