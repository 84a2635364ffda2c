"""`python -m stream_workers <worker> [options]`: run one daemon.

`<worker>` is a module of this package with dashes for underscores (`price-alerts` runs
`stream_workers/price_alerts.py`); each worker module has `main(argv) -> int`.
"""

from __future__ import annotations

import importlib
import logging
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
    workers = available()
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in workers:
        known = ", ".join(workers) or "(none yet)"
        print(
            f"usage: python -m stream_workers <worker> [options]\nworkers: {known}", file=sys.stderr
        )
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    module = importlib.import_module(f"stream_workers.{argv[0].replace('-', '_')}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
