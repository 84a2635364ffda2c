"""`python -m sources <source> [options]`: run one producer command.

`<source>` is a module of this package with dashes for underscores (`trades` runs
`sources/trades.py`); each source module has `main(argv) -> int`.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    here = Path(__file__).resolve().parent
    return sorted(
        m.name.replace("_", "-")
        for m in pkgutil.iter_modules([str(here)])
        if not m.name.startswith("_")
    )


def main(argv: list[str]) -> int:
    sources = available()
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in sources:
        known = ", ".join(sources) or "(none yet)"
        print(f"usage: python -m sources <source> [options]\nsources: {known}", file=sys.stderr)
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    module = importlib.import_module(f"sources.{argv[0].replace('-', '_')}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
