"""The qrexec policy engine, shared with the collection (plugins/module_utils/qrexec_policy.py).

qubesim runs from a checkout of the collection (installed in editable mode), so it loads the one
implementation from there instead of carrying a copy.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ENGINE = Path(__file__).resolve().parents[1] / "plugins" / "module_utils" / "qrexec_policy.py"


@functools.cache
def engine() -> ModuleType:
    name = "qubesim_qrexec_policy"
    spec = importlib.util.spec_from_file_location(name, ENGINE)
    if spec is None or spec.loader is None:
        raise ImportError(f"the qrexec policy engine is missing: {ENGINE}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module
