"""Sub-command dispatch shared by `python -m stream_workers` and `python -m sources`."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from types import ModuleType


def available(package: ModuleType) -> list[str]:
    """The package's command names: its public modules, dashes for underscores."""
    return sorted(
        m.name.replace("_", "-")
        for m in pkgutil.iter_modules(package.__path__)
        if not m.name.startswith("_")
    )


def dispatch(package: ModuleType, argv: list[str], what: str) -> int:
    """Run `<package>.<argv[0]>.main(argv[1:])`, or print the usage with the known names."""
    names = available(package)
    if not argv or argv[0] not in names:
        prog = package.__name__
        print(
            f"usage: python -m {prog} <{what}> [options]\n{what}s: {', '.join(names) or '(none yet)'}",
            file=sys.stderr,
        )
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    module = importlib.import_module(f"{package.__name__}.{argv[0].replace('-', '_')}")
    return module.main(argv[1:])
