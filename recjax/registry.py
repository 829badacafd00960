"""Name -> entry registries for models and tasks; imports nothing from recjax.

Each registry knows which module registers each built-in name and imports that module the
first time the name is looked up, so a lookup never needs the caller to import model or task
code first (and ``recjax.config`` validates a model section without importing any model).
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any


class UnknownNameError(LookupError):
    """A name no module registers; the message lists the registered names."""


class Registry:
    """``name -> entry``; ``modules[name]`` is the module whose import registers ``name``."""

    def __init__(self, kind: str, modules: dict[str, str]):
        self.kind = kind
        self.modules = dict(modules)
        self._entries: dict[str, Any] = {}

    def register(self, name: str, entry: Any) -> None:
        self._entries[name] = entry

    def names(self) -> list[str]:
        return sorted(set(self.modules) | set(self._entries))

    def get(self, name: str) -> Any:
        if name not in self._entries and name in self.modules:
            importlib.import_module(self.modules[name])
        if name not in self._entries:
            close = difflib.get_close_matches(str(name), self.names(), n=1)
            hint = f" did you mean '{close[0]}'?" if close else ""
            raise UnknownNameError(f"unknown {self.kind} '{name}';{hint} registered: {self.names()}")
        return self._entries[name]


MODELS = Registry("model", {
    "dlrm": "recjax.models.dlrm",
    "dcnv2": "recjax.models.dcnv2",
    "rankmixer": "recjax.models.rankmixer",
    "tokenmixer_large": "recjax.models.tokenmixer_large",
    "wukong": "recjax.models.wukong",
    "kunlun": "recjax.models.kunlun",
    "hemix": "recjax.models.hemix",
    "mmoe": "recjax.models.multitask",
    "ple": "recjax.models.multitask",
    "smes": "recjax.models.multitask",
    "seqrec": "recjax.models.seqrec",
})

TASKS = Registry("task", {
    "ctr": "recjax.tasks.ctr",
    "seqrec": "recjax.tasks.seqrec",
})
