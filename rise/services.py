"""Where each model service lives: its config class and its `start` coroutine, by name.

The CLI and the demo look services up here (imports are lazy so `import rise` stays light).
"""

from __future__ import annotations

import importlib
from typing import Any

SERVICES = {
    "policy": ("services.policy.server", "PolicyConfig"),
    "value": ("services.value.server", "ValueConfig"),
    "dynamics": ("services.dynamics.server", "DynamicsConfig"),
    "trainer": ("services.trainer.server", "TrainerConfig"),
}


def service(name: str) -> tuple[type, Any]:
    """(config class, async start(config) -> RunningServer) of a service."""
    if name not in SERVICES:
        raise ValueError(f"unknown service {name!r}; choose one of {sorted(SERVICES)}")
    module_name, config_name = SERVICES[name]
    module = importlib.import_module(module_name)
    return getattr(module, config_name), module.start
