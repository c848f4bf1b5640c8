"""Render a role's Jinja templates and variables as Ansible does, without a play: Ansible's own
filters and tests, undefined variables an error, `trim_blocks` as the template module sets it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
import yaml
from ansible.plugins.filter.core import FilterModule
from ansible.plugins.test.core import TestModule

ROOT = Path(__file__).resolve().parents[3]
ROLES = ROOT / "roles"


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        trim_blocks=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    )
    env.filters.update(FilterModule().filters())
    env.tests.update(TestModule().tests())
    return env


def role_file(role: str, name: str) -> Any:
    """A role's defaults/main.yml or vars/main.yml, as YAML gives it (templates unrendered)."""
    return yaml.safe_load((ROLES / role / name).read_text())


def render_template(role: str, name: str, **variables: Any) -> str:
    """templates/NAME of the role with the role's defaults under `variables`."""
    values = {"ansible_managed": "Ansible managed", **role_file(role, "defaults/main.yml")}
    source = (ROLES / role / "templates" / name).read_text()
    return environment().from_string(source).render(**{**values, **variables})


def render_expression(text: str, **variables: Any) -> Any:
    """A variable's `{{ ... }}` value, evaluated as one Jinja expression."""
    expression = text.strip()
    assert expression.startswith("{{") and expression.endswith("}}"), expression
    return environment().compile_expression(expression[2:-2].strip())(**variables)
