"""`python -m sources <source> [options]`: run one producer command.

`<source>` is a module of this package with dashes for underscores (`trades` runs
`sources/trades.py`); each source module has `main(argv) -> int`.
"""

import sys

import sources
from tasks.commands import dispatch, setup_logging

if __name__ == "__main__":
    setup_logging()  # LOG_FORMAT=json: one JSON object per line
    sys.exit(dispatch(sources, sys.argv[1:], "source"))
