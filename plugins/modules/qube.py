#!/usr/bin/python
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: qube
short_description: A qube, its class, properties, volume size, tags, features and power state
version_added: 0.1.0
description:
  - Makes a qube be as described, through dom0's qvm tools (on a real dom0 or in qubesim).
  - Only what is given is managed; everything else of the qube is left as it is.
  - The private volume only grows; a smaller O(volume_size) is an error, and nothing is changed.
  - Qubes refuses some changes while a qube runs. With O(state=halted) the qube is shut down
    before its properties change. Otherwise, changing the O(template) of a running qube, or
    giving a running qube a halted O(netvm), fails before anything is changed, with a message
    that names the qube and the rule.
author:
  - qubes_infra.build maintainers (!UNKNOWN)
options:
  name:
    description: The qube.
    type: str
    required: true
  state:
    description:
      - V(present) creates the qube if needed; V(running) and V(halted) also set its power state;
        V(absent) removes it (shutting it down first).
    type: str
    choices: [present, absent, running, halted]
    default: present
  klass:
    description: The class of a new qube. An existing qube of another class is an error.
    type: str
    choices: [AppVM, TemplateVM, StandaloneVM, DispVM]
    default: AppVM
    aliases: [class]
  template:
    description:
      - The template of an AppVM, or the disposable template of a DispVM.
      - For a StandaloneVM, the template it is copied from when it is created.
    type: str
  label:
    description: The label; required to create a qube.
    type: str
    choices: [red, orange, yellow, green, gray, blue, purple, black]
  netvm:
    description:
      - The qube that gives it network; an empty string (or V(None), as C(qvm-prefs) prints it)
        means none. Unset leaves it alone.
    type: str
  properties:
    description: Other properties (qvm-prefs names) and their values.
    type: dict
    default: {}
  volume_size:
    description: The least size of the private volume, like V(20GiB) or a number of bytes.
    type: str
  tags:
    description: Tags the qube must have (others are left alone).
    type: list
    elements: str
    default: []
  features:
    description: Features to set; a null value unsets the feature.
    type: dict
    default: {}
  services:
    description: Qube services to enable (true) or disable (false).
    type: dict
    default: {}
attributes:
  check_mode:
    description: Reports what would change, and changes nothing.
    support: full
  diff_mode:
    description: Shows the settings that change, before and after.
    support: full
"""

EXAMPLES = r"""
- name: The build qube of the fedora environment
  qubes_infra.build.qube:
    name: build-fedora
    template: fedora-43-xfce
    label: green
    netvm: sys-whonix
    volume_size: 60GiB

- name: A keys qube never has network
  qubes_infra.build.qube:
    name: keys-fedora
    template: fedora-43-minimal
    label: black
    netvm: ""
"""

RETURN = r"""
qube:
  description: The settings this run changed, with their new values.
  returned: always
  type: dict
  sample: {"label": "green", "netvm": "sys-whonix", "running": true}
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.qubes_infra.build.plugins.module_utils.sizes import SizeError, parse_size


class Qvm:
    """dom0's qvm tools, called without a shell."""

    def __init__(self, module: AnsibleModule) -> None:
        self.module = module

    def run(self, *argv: str, check: bool = True) -> tuple[int, str, str]:
        rc, out, err = self.module.run_command(list(argv))
        if check and rc != 0:
            self.module.fail_json(
                msg=f"{' '.join(argv)} failed (rc {rc}): {err.strip() or out.strip()}"
            )
        return rc, out, err

    def exists(self, name: str) -> bool:
        return self.run("qvm-check", "--quiet", name, check=False)[0] == 0

    def running(self, name: str) -> bool:
        return self.run("qvm-check", "--running", "--quiet", name, check=False)[0] == 0

    def prefs(self, name: str) -> dict[str, str]:
        """The qube's properties as qvm-prefs lists them (`NAME  D|-  VALUE`), an empty qube
        reference (printed `None`) read as ""."""
        values = {}
        for line in self.run("qvm-prefs", name)[1].splitlines():
            fields = line.split(None, 2)
            if len(fields) >= 2:
                value = fields[2].strip() if len(fields) == 3 else ""
                values[fields[0]] = _reference(fields[0], value)
        return values

    def listing(self, *argv: str) -> dict[str, str]:
        result = {}
        for line in self.run(*argv)[1].splitlines():
            key, _sep, value = line.strip().partition(" ")
            if key:
                result[key] = value.strip()
        return result


# The properties that name a qube; qvm-prefs prints an empty one as `None` and reads "" or
# "none" as empty (qubesadmin/tools/qvm_prefs.py).
REFERENCES = frozenset(
    {"template", "netvm", "default_dispvm", "management_dispvm", "guivm", "audiovm"}
)


def _reference(prop: str, value: str) -> str:
    """An empty qube reference as "", however it is spelled."""
    if prop in REFERENCES and value.lower() == "none":
        return ""
    return value


# The classes with a template property; a StandaloneVM's template is only what it is copied from.
TEMPLATE_BASED = ("AppVM", "DispVM")


def _desired_prefs(params: dict[str, object]) -> dict[str, str]:
    desired = {key: _stringify(value) for key, value in params["properties"].items()}
    keys = (
        ("template", "label", "netvm") if params["klass"] in TEMPLATE_BASED else ("label", "netvm")
    )
    for key in keys:
        if params[key] is not None:
            desired[key] = str(params[key])
    return {key: _reference(key, value) for key, value in desired.items()}


def _stringify(value: object) -> str:
    """A value as qvm-prefs prints it."""
    if isinstance(value, bool):
        return "True" if value else "False"
    return "" if value is None else str(value)


class QubeState:
    """Compares a qube with what is wanted and makes the changes (unless in check mode)."""

    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        self.params = module.params
        self.qvm = Qvm(module)
        self.name = self.params["name"]
        self.changed = False
        self.before: dict[str, object] = {}
        self.after: dict[str, object] = {}

    def change(self, *argv: str) -> None:
        self.changed = True
        if not self.module.check_mode:
            self.qvm.run(*argv)

    def _create(self) -> None:
        if self.params["label"] is None:
            self.module.fail_json(msg=f"creating qube {self.name!r} needs a label")
        argv = ["qvm-create", "--class", self.params["klass"], "--label", self.params["label"]]
        if self.params["template"]:
            argv += ["--template", self.params["template"]]
        self.change(*argv, self.name)

    def _properties(self, current: dict[str, str], running: bool) -> None:
        changes = {
            key: value
            for key, value in _desired_prefs(self.params).items()
            if current.get(key) != value
        }
        if running:
            self._refuse_what_qubesd_refuses(changes)
        for key, value in changes.items():
            self.before[key] = current.get(key)
            self.after[key] = value
            self.change("qvm-prefs", self.name, key, value)

    def _refuse_what_qubesd_refuses(self, changes: dict[str, str]) -> None:
        """Fail before any change, naming the qube and the rule, where qubesd would refuse a
        change because the qube runs (qubes/vm/appvm.py, qubes/vm/mix/net.py)."""
        if "template" in changes:
            self.module.fail_json(
                msg=f"qube {self.name!r} is running: Qubes cannot change the template of a"
                " running qube; shut it down first (state: halted does so before the change)"
            )
        netvm = changes.get("netvm")
        if netvm and not (self.qvm.exists(netvm) and self.qvm.running(netvm)):
            self.module.fail_json(
                msg=f"qube {self.name!r} is running and its new netvm {netvm!r} is not: Qubes"
                f" cannot attach a running qube to a halted netvm; start {netvm!r} first"
            )

    def _volume(self) -> None:
        wanted_text = self.params["volume_size"]
        if wanted_text is None:
            return
        try:
            wanted = parse_size(wanted_text, "volume_size")
        except SizeError as error:
            self.module.fail_json(msg=str(error))
        current = 0
        if self.qvm.exists(self.name):
            current = int(
                self.qvm.run("qvm-volume", "info", f"{self.name}:private", "size")[1].strip()
            )
        if current and wanted < current:
            self.module.fail_json(
                msg=f"volume_size: {wanted_text} is smaller than the private volume of {self.name}"
                f" ({current} bytes); it can only grow"
            )
        if wanted > current:
            self.before["volume_size"] = current
            self.after["volume_size"] = wanted
            self.change("qvm-volume", "extend", f"{self.name}:private", str(wanted))

    def _tags(self) -> None:
        current = set()
        if self.qvm.exists(self.name):
            current = set(self.qvm.run("qvm-tags", self.name, "list")[1].split())
        missing = [tag for tag in self.params["tags"] if tag not in current]
        if missing:
            self.before["tags"] = sorted(current)
            self.after["tags"] = sorted(current | set(missing))
            self.change("qvm-tags", self.name, "add", *missing)

    def _features(self) -> None:
        current = self.qvm.listing("qvm-features", self.name) if self.qvm.exists(self.name) else {}
        for key, value in self.params["features"].items():
            if value is None and key in current:
                self.before[f"feature {key}"], self.after[f"feature {key}"] = current[key], None
                self.change("qvm-features", "--unset", self.name, key)
            elif value is not None and current.get(key) != _stringify(value):
                self.before[f"feature {key}"] = current.get(key)
                self.after[f"feature {key}"] = _stringify(value)
                self.change("qvm-features", self.name, key, _stringify(value))

    def _services(self) -> None:
        current = self.qvm.listing("qvm-service", self.name) if self.qvm.exists(self.name) else {}
        for service, enabled in self.params["services"].items():
            word = "on" if enabled else "off"
            if current.get(service) != word:
                self.before[f"service {service}"], self.after[f"service {service}"] = (
                    current.get(service),
                    word,
                )
                self.change("qvm-service", self.name, service, word)

    def _power(self) -> None:
        state = self.params["state"]
        if state not in ("running", "halted"):
            return
        running = self.qvm.exists(self.name) and self.qvm.running(self.name)
        if state == "running" and not running:
            self.before["running"], self.after["running"] = False, True
            self.change("qvm-start", self.name)
        elif state == "halted" and running:
            self.before["running"], self.after["running"] = True, False
            self.change("qvm-shutdown", "--wait", self.name)

    def ensure_present(self) -> None:
        exists = self.qvm.exists(self.name)
        if not exists:
            self.before["state"], self.after["state"] = "absent", "present"
            self._create()
        elif self.params["klass"] != self.qvm.prefs(self.name).get("klass"):
            self.module.fail_json(msg=f"qube {self.name!r} exists with another class")
        # A qube to be halted is halted first: then changes Qubes refuses on a running qube
        # (its template, a halted netvm) are made.
        if self.params["state"] == "halted":
            self._power()
        running = exists and self.params["state"] != "halted" and self.qvm.running(self.name)
        current = self.qvm.prefs(self.name) if self.qvm.exists(self.name) else {}
        self._properties(current, running)
        self._volume()
        self._tags()
        self._features()
        self._services()
        if self.params["state"] == "running":
            self._power()

    def ensure_absent(self) -> None:
        if not self.qvm.exists(self.name):
            return
        self.before["state"], self.after["state"] = "present", "absent"
        if self.qvm.running(self.name):
            self.change("qvm-shutdown", "--wait", self.name)
        self.change("qvm-remove", "--force", self.name)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "name": {"type": "str", "required": True},
            "state": {
                "type": "str",
                "default": "present",
                "choices": ["present", "absent", "running", "halted"],
            },
            "klass": {
                "type": "str",
                "default": "AppVM",
                "aliases": ["class"],
                "choices": ["AppVM", "TemplateVM", "StandaloneVM", "DispVM"],
            },
            "template": {"type": "str"},
            "label": {
                "type": "str",
                "choices": ["red", "orange", "yellow", "green", "gray", "blue", "purple", "black"],
            },
            "netvm": {"type": "str"},
            "properties": {"type": "dict", "default": {}},
            "volume_size": {"type": "str"},
            "tags": {"type": "list", "elements": "str", "default": []},
            "features": {"type": "dict", "default": {}},
            "services": {"type": "dict", "default": {}},
        },
        supports_check_mode=True,
    )
    qube = QubeState(module)
    if module.params["state"] == "absent":
        qube.ensure_absent()
    else:
        qube.ensure_present()
    diff = {"before": qube.before, "after": qube.after} if qube.changed else {}
    module.exit_json(changed=qube.changed, diff=diff, qube=qube.after)


if __name__ == "__main__":
    main()
