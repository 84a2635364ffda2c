"""`python -m stream_workers <worker> [options]`: run one daemon.

`<worker>` is a module of this package with dashes for underscores (`price-alerts` runs
`stream_workers/price_alerts.py`); each worker module has `main(argv) -> int` and stops
cleanly on SIGTERM (finish the batch, commit, exit 0).
"""

import sys

import stream_workers
from tasks.commands import dispatch, setup_logging

if __name__ == "__main__":
    setup_logging()  # LOG_FORMAT=json: one JSON object per line
    sys.exit(dispatch(stream_workers, sys.argv[1:], "worker"))
