"""Tests import the collection as Ansible does: from .collections/ansible_collections, a link
tree that `make bootstrap` creates (ansible_collections/qubes_infra/build -> the repository)."""

from __future__ import annotations

import sys
from pathlib import Path

COLLECTIONS = Path(__file__).resolve().parents[1] / ".collections"
if str(COLLECTIONS) not in sys.path:
    sys.path.insert(0, str(COLLECTIONS))
