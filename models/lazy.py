"""Lazy package exports: a package lists `name -> module` and each name is imported on first use,
so importing one light module (a config dataclass) does not import torch and every model."""
from __future__ import annotations

import sys
from importlib import import_module


def lazy_exports(package: str, exports: dict[str, str]):
    """(`__getattr__`, `__dir__`) for module `package` whose public names are `exports`."""

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(module), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__():
        return sorted(exports)

    return __getattr__, __dir__
