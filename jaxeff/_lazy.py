"""Lazy package exports: a package whose names load their module on first use, so importing the
package (as ``jaxeff.cli`` does for every command) does not import JAX."""

import importlib


def lazy_getattr(package: str, exports: dict[str, str]):
    """A module ``__getattr__`` that resolves ``exports`` (name -> defining module) on demand."""

    def __getattr__(name):
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        if not name.startswith("_"):  # a submodule, as after `import package.name`
            try:
                return importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as e:
                if e.name != f"{package}.{name}":
                    raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
