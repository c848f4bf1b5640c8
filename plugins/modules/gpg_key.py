#!/usr/bin/python
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: gpg_key
short_description: An OpenPGP key in a GnuPG keyring, imported or generated only when absent
version_added: 0.2.0
description:
  - Makes sure one primary key is in a GnuPG home (public, or with its secret part), its owner
    trust as asked, and returns its fingerprint (and, on request, its public key).
  - A key is imported from O(key) only when it is absent (with O(secret), when its secret part is
    absent), and generated from O(generate_uid) only when no secret key has exactly that user ID,
    so a second run changes nothing.
  - The key text is read with C(gpg --show-keys) before anything is imported, in check mode
    too. A text without exactly the expected primary key is refused and nothing is imported.
author:
  - qubes_infra.build maintainers (!UNKNOWN)
requirements:
  - gpg (GnuPG 2.2 or later) on the target
options:
  fingerprint:
    description:
      - The primary key's fingerprint (40 hexadecimal digits; spaces and case do not matter).
      - Without it, O(key) must hold exactly one primary key, or O(generate_uid) is used.
    type: str
  key:
    description:
      - An ASCII-armored key to import when the key is absent. It must hold exactly one primary
        key (O(fingerprint), when given). With O(secret), it must hold the secret part.
    type: str
  secret:
    description: The secret part must be in the keyring too (imported from O(key) if absent).
    type: bool
    default: false
  generate_uid:
    description:
      - Generate a signing key with this user ID when no secret key has exactly this user ID
        (and no O(fingerprint) or O(key) is given). It has no passphrase, since the qube that
        holds the keyring is what protects it.
    type: str
  algorithm:
    description: The algorithm of a generated key, as C(gpg --quick-gen-key) names it.
    type: str
    default: ed25519
  trust:
    description: The owner trust the key must have; left as it is when not given.
    type: str
    choices: [undefined, never, marginal, full, ultimate]
  export:
    description: Return the public key, ASCII-armored, in RV(public_key).
    type: bool
    default: false
  homedir:
    description: The GnuPG home; the user's own (C(GNUPGHOME) or C(~/.gnupg)) when not given.
    type: path
attributes:
  check_mode:
    description: Reports what would be imported, generated or trusted; changes nothing.
    support: full
  diff_mode:
    description: The key's presence, secret part and trust before and after.
    support: full
"""

EXAMPLES = r"""
- name: The environment's signing key, generated in the keys qube on first run
  qubes_infra.build.gpg_key:
    generate_uid: Qubes build signing key (fedora)
    secret: true
    export: true
  register: signing_key

- name: The logs key, imported with its secret part and trusted
  qubes_infra.build.gpg_key:
    fingerprint: 0123456789ABCDEF0123456789ABCDEF01234567
    key: "{{ logs_secret_key }}"
    secret: true
    trust: ultimate
  no_log: true
"""

RETURN = r"""
fingerprint:
  description:
    - The primary key's fingerprint, upper case.
    - Empty in check mode when the key would be generated.
  returned: always
  type: str
  sample: 0123456789ABCDEF0123456789ABCDEF01234567
public_key:
  description: The public key, ASCII-armored.
  returned: when O(export) is true and the key is there
  type: str
"""

import re

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.qubes_infra.build.plugins.module_utils.openpgp import listed_primaries

FINGERPRINT = re.compile(r"[0-9A-F]{40}\Z")
# gpg --export-ownertrust's levels (GnuPG's TRUST_* values).
TRUST_LEVELS = {"undefined": 2, "never": 3, "marginal": 4, "full": 5, "ultimate": 6}


class Keyring:
    """One GnuPG home, driven through gpg in batch mode."""

    def __init__(self, module: AnsibleModule, homedir: str | None) -> None:
        self.module = module
        self.gpg = [module.get_bin_path("gpg", required=True), "--batch", "--no-tty"]
        if homedir:
            self.gpg += ["--homedir", homedir]

    def run(self, *arguments: str, data: str | None = None, check: bool = True) -> str:
        rc, out, err = self.module.run_command([*self.gpg, *arguments], data=data,
                                               binary_data=True)  # fmt: skip
        if check and rc != 0:
            self.module.fail_json(msg=f"gpg {arguments[0]} failed (exit {rc}): {err.strip()}")
        return out if rc == 0 else ""

    def has(self, fingerprint: str, secret: bool) -> bool:
        listing = "--list-secret-keys" if secret else "--list-keys"
        return fingerprint in listed_primaries(
            self.run("--with-colons", listing, "--", fingerprint, check=False)
        )

    def secret_with_uid(self, uid: str) -> list[str]:
        return listed_primaries(
            self.run("--with-colons", "--list-secret-keys", "--", f"={uid}", check=False)
        )

    def key_text(self, text: str, secret: bool) -> str:
        """The one primary fingerprint of an armored key text, which holds a secret key when
        asked; fails naming what the text holds."""
        listing = self.run("--with-colons", "--show-keys", data=text, check=False)
        primaries = listed_primaries(listing)
        if len(primaries) != 1:
            self.module.fail_json(
                msg=f"key: must hold exactly one primary key, holds {len(primaries)}"
            )
        if secret and not any(line.startswith("sec:") for line in listing.splitlines()):
            self.module.fail_json(msg="key: secret is true, but key holds no secret key")
        return primaries[0]

    def trust(self, fingerprint: str) -> int | None:
        for line in self.run("--export-ownertrust").splitlines():
            fields = line.split(":")
            if len(fields) >= 2 and fields[0].upper() == fingerprint and fields[1].isdigit():
                return int(fields[1])
        return None


def wanted_fingerprint(module: AnsibleModule) -> str:
    """O(fingerprint) normalised, or empty; fails naming the option when malformed."""
    given = "".join((module.params["fingerprint"] or "").split()).upper()
    if given and not FINGERPRINT.match(given):
        module.fail_json(msg=f"fingerprint: {given!r} is not 40 hexadecimal digits")
    return given


def state(keyring: Keyring, fingerprint: str) -> dict[str, object]:
    if not fingerprint:
        return {"fingerprint": "", "present": False, "secret": False, "trust": None}
    return {
        "fingerprint": fingerprint,
        "present": keyring.has(fingerprint, secret=False),
        "secret": keyring.has(fingerprint, secret=True),
        "trust": keyring.trust(fingerprint),
    }


def known_fingerprint(module: AnsibleModule, keyring: Keyring) -> str:
    """The key this task is about, before any change: O(fingerprint), the one in O(key) (which
    must agree with it), or the secret key holding O(generate_uid) (empty when there is none)."""
    params = module.params
    fingerprint = wanted_fingerprint(module)
    if params["key"]:
        from_text = keyring.key_text(params["key"], params["secret"])
        if fingerprint and from_text != fingerprint:
            module.fail_json(msg=f"key: holds {from_text}, not fingerprint {fingerprint}")
        return from_text
    if params["generate_uid"]:
        held = keyring.secret_with_uid(params["generate_uid"])
        return held[0] if held else ""
    return fingerprint


def ensure_key(module: AnsibleModule, keyring: Keyring, fingerprint: str) -> tuple[str, bool]:
    """The key's fingerprint once it is in the keyring, and whether this changed anything."""
    params = module.params
    secret = params["secret"] or bool(params["generate_uid"])
    if fingerprint and keyring.has(fingerprint, secret):
        return fingerprint, False
    if params["key"]:
        if not module.check_mode:
            keyring.run("--import", data=params["key"])
        return fingerprint, True
    if fingerprint:
        kind = "secret key" if secret else "key"
        module.fail_json(msg=f"fingerprint: no {kind} {fingerprint} here, and no key given")
    if module.check_mode:
        return "", True
    uid = params["generate_uid"]
    keyring.run("--passphrase", "", "--quick-gen-key", uid, params["algorithm"], "sign", "never")
    generated = keyring.secret_with_uid(uid)
    if not generated:
        module.fail_json(msg=f"generate_uid: gpg made no secret key with user ID {uid!r}")
    return generated[0], True


def ensure_trust(module: AnsibleModule, keyring: Keyring, fingerprint: str) -> bool:
    wanted = module.params["trust"]
    if wanted is None or not fingerprint:
        return wanted is not None and module.check_mode
    level = TRUST_LEVELS[wanted]
    if keyring.trust(fingerprint) == level:
        return False
    if not module.check_mode:
        keyring.run("--import-ownertrust", data=f"{fingerprint}:{level}:\n")
    return True


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "fingerprint": {"type": "str"},
            "key": {"type": "str", "no_log": True},
            "secret": {"type": "bool", "default": False},
            "generate_uid": {"type": "str"},
            "algorithm": {"type": "str", "default": "ed25519"},
            "trust": {"type": "str", "choices": list(TRUST_LEVELS)},
            "export": {"type": "bool", "default": False},
            "homedir": {"type": "path"},
        },
        required_one_of=[("fingerprint", "key", "generate_uid")],
        mutually_exclusive=[("generate_uid", "fingerprint"), ("generate_uid", "key")],
        supports_check_mode=True,
    )
    keyring = Keyring(module, module.params["homedir"])
    fingerprint = known_fingerprint(module, keyring)
    before = state(keyring, fingerprint)
    fingerprint, key_changed = ensure_key(module, keyring, fingerprint)
    trust_changed = ensure_trust(module, keyring, fingerprint)
    after = state(keyring, fingerprint)
    if module.check_mode:
        after = {**after, "fingerprint": fingerprint, "present": True}
        after["secret"] = (
            after["secret"] or module.params["secret"] or bool(module.params["generate_uid"])
        )
        if module.params["trust"]:
            after["trust"] = TRUST_LEVELS[module.params["trust"]]
    result: dict[str, object] = {
        "changed": key_changed or trust_changed,
        "fingerprint": fingerprint,
        "diff": {"before": before, "after": after},
    }
    if module.params["export"] and fingerprint and not (module.check_mode and key_changed):
        result["public_key"] = keyring.run("--armor", "--export", "--", fingerprint)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
