"""verify.yml's decisions in dom0: what a qube printed is parsed, bounded and only fills its own
rows; each rule fails with its fix."""

from __future__ import annotations

from typing import Any

from ansible_collections.qubes_infra.build.plugins.module_utils.openpgp import listed_primaries
from ansible_collections.qubes_infra.build.plugins.plugin_utils.verify_report import (
    MAX_SHOWN,
    conf_rows,
    report,
    verified_tags,
)

KEY = "7672685F9E5380D0F070D2960A227B98B3C04C09"
SUBKEY = "C4E9B7E846E789DC5051B4E4D75AC076E9C27752"
LISTING = f"sec:u:255:22:0A227B98B3C04C09:1::::::scESC:::+:::23::0:\nfpr:::::::::{KEY}:\n" + (
    f"ssb:u:255:18:D75AC076E9C27752:1::::::e:::+:::cv25519::\nfpr:::::::::{SUBKEY}:\n"
)
CONF = (
    "DIST_DOM0 ?= fc37\nDISTS_VM ?= fc37 \\\n    bookworm\n"
    "COMPONENTS ?= core-admin builder-github\n# NO_SIGN ?= 1\n"
    "LINUX_REPO_BASEDIR ?= $(SRC_DIR)/linux-yum\ninclude $(HOME)/builder-github.conf\n"
)
VALUES = (
    f"NO_SIGN=\nSIGN_KEY={KEY}\nDISTS_VM=fc37 bookworm\nDIST_DOM0=fc37\n"
    "COMPONENTS=core-admin builder-github\nLINUX_REPO_BASEDIR=/linux-yum\n"
)


def builder(**changes: str) -> dict[str, str]:
    return {"conf": CONF, "conf_rc": "0", "conf_values": VALUES, "conf_values_rc": "0", **changes}


def failed(rows: list[Any]) -> dict[str, str]:
    return {row.check: row.detail for row in rows if not row.ok}


def test_primary_fingerprints_only() -> None:
    assert listed_primaries(LISTING) == [KEY]
    assert listed_primaries(LISTING.replace("sec:", "pub:")) == [KEY]


def test_a_release_configuration_as_it_should_be_passes() -> None:
    assert failed(conf_rows("build-fedora", "/b", builder(), KEY)) == {}


def test_each_builder_conf_rule_names_its_fix() -> None:
    def broken(**changes: str) -> dict[str, str]:
        return failed(conf_rows("build-fedora", "/b", builder(**changes), KEY))

    assert broken(conf_values=VALUES.replace("NO_SIGN=", "NO_SIGN=1")) == {
        "builder.conf no NO_SIGN": "/b/builder.conf: NO_SIGN is 1: remove it, builds must be signed"
    }
    forced = broken(conf=CONF.replace("DIST_DOM0 ?=", "DIST_DOM0 :="))
    assert list(forced) == ["builder.conf DIST_DOM0 ?="]
    assert "DIST_DOM0 :=: set it with DIST_DOM0 ?=" in forced["builder.conf DIST_DOM0 ?="]
    assert list(broken(conf=CONF.replace("include", "#include"))) == [
        "builder.conf includes builder-github.conf"
    ]
    assert list(broken(conf_values=VALUES.replace(" builder-github", ""))) == [
        "builder.conf builder-github"
    ]
    assert list(broken(conf_values=VALUES.replace(KEY, SUBKEY))) == ["builder.conf SIGN_KEY"]
    assert list(broken(conf_values_rc="2")) == ["/b/builder.conf"]


def test_a_tag_counts_only_with_a_good_signature_by_a_trusted_key() -> None:
    status = ("NEWSIG", "GOODSIG 1 x", "VALIDSIG A", "TRUST_ULTIMATE 0 pgp")
    good = "".join(f"[GNUPG:] {line}\n" for line in status)
    untrusted = good.replace("TRUST_ULTIMATE", "TRUST_UNDEFINED")
    two = "[GNUPG:] NEWSIG\n" + good
    assert verified_tags(f"TAG v1\n{good}TAG v2\n{untrusted}TAG v3\n{two}TAG v4\n") == ["v1"]


def test_a_qube_cannot_add_rows_or_lines_to_the_table() -> None:
    """A hostile head (newlines, a fake row, a huge text) is shown on one bounded line of its
    own qube's row."""
    hostile = "x\nkeys-fedora  signing key  ok  fine\n" + "y" * 100000
    entry = {
        "qube": "build-fedora",
        "kind": "build",
        "expect": {"env": "fedora", "keys_vm": "keys-fedora", "sign_key": KEY,
                   "exported_file": "/k.asc", "builders": ["/b"], "builder_commit": "a" * 40},
        "facts": {"secret_keys": "", "builders": {"/b": builder(head=hostile)}},
    }  # fmt: skip
    result = report([entry], {}, [], None)
    assert len(result["lines"]) == 1 + result["checks"]
    pinned = next(line for line in result["lines"] if " at pin " in line)
    assert pinned.startswith("build-fedora") and "\n" not in pinned
    assert len(pinned) < 300 and "?" in pinned and "..." in pinned
    assert MAX_SHOWN < 100


def test_a_qube_without_facts_is_one_failed_row() -> None:
    entry = {"qube": "keys-kernel", "kind": "keys", "expect": {}}
    result = report([entry], {}, [], None)
    assert result["failed"] == 1
    assert "FAIL" in result["lines"][1] and "qvm-start keys-kernel" in result["lines"][1]
