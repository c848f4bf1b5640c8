"""Tests import the collection as Ansible does: from .collections/ansible_collections, a link
tree that `make bootstrap` creates (ansible_collections/qubes_infra/build -> the repository),
and the services package from services/, as its entry points do in a qube."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT / ".collections", ROOT / "services"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
