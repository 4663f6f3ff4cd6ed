"""Import every module of a package, so that adding a file is enough to register what it holds."""

from __future__ import annotations

import importlib
import pkgutil


def import_submodules(package_name: str, package_path) -> list[str]:
    names = sorted(m.name for m in pkgutil.iter_modules(package_path) if not m.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{package_name}.{name}")
    return names
