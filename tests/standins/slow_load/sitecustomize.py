"""A model load the test holds on purpose: put this folder first on PYTHONPATH and set
FLEET_TEST_LOAD_GATE to a file path; every ``Placement.load`` waits until that file exists.

The delay is injected from the test (Python imports ``sitecustomize`` at start-up); production
code has no setting for it. The wrapper is installed when ``worker.engine.placement`` is
imported, by a one-shot import hook, so processes that never load a model pay nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import time
from typing import Any

GATE = os.environ.get("FLEET_TEST_LOAD_GATE")
TARGET = "worker.engine.placement"


class _HoldLoads(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.loader is not None
        loader: Any = spec.loader
        real_exec = loader.exec_module

        def exec_module(module: Any) -> None:
            real_exec(module)
            real_load = module.Placement.load

            def held_load(self: Any, settings: Any) -> Any:
                print(f"stand-in: model load held until {GATE} exists", flush=True)
                while not os.path.exists(str(GATE)):
                    time.sleep(0.05)
                return real_load(self, settings)

            module.Placement.load = held_load

        loader.exec_module = exec_module
        return spec


if GATE:
    sys.meta_path.insert(0, _HoldLoads())
