"""`python -m stream_workers <worker> [options]`: run one daemon.

`<worker>` is a module of this package with dashes for underscores (`price-alerts` runs
`stream_workers/price_alerts.py`); each worker module has `main(argv) -> int` and stops
cleanly on SIGTERM (finish the batch, commit, exit 0).
"""

import logging
import sys

import stream_workers
from tasks.commands import dispatch

if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("kafka").setLevel(logging.WARNING)  # its INFO is per connection
    sys.exit(dispatch(stream_workers, sys.argv[1:], "worker"))
