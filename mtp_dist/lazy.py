"""Package attributes imported on first use, so that `mtp --help` and a command's argument
errors do not pay for importing torch through a package's `__init__`."""

from __future__ import annotations

from importlib import import_module


def lazy_exports(package: str, exports: dict[str, str]):
    """A module `__getattr__` for `package` serving each name of `exports` (name -> submodule)
    from its submodule, imported when the name is first asked for."""

    def __getattr__(name: str):
        if name in exports:
            return getattr(import_module(f".{exports[name]}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
