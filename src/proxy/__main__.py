"""`python -m gridserve.proxy`: parse the flags, set up logging, run the HTTP proxy until signalled."""
from __future__ import annotations

import asyncio
import faulthandler
import sys

from gridserve.common.errors import FatalError
from gridserve.common.eventlog import setup_logging
from gridserve.common.procs import watch_event_loop
from gridserve.proxy.settings import parse_config
from gridserve.proxy.server import serve


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 after a clean stop, 2 for bad flags, 3 for a fatal error (e.g. the port is taken)."""
    faulthandler.enable()  # a native crash leaves its stack in the log
    cfg = parse_config(argv)
    setup_logging("proxy", cfg.log_level)
    try:
        return asyncio.run(watch_event_loop(serve(cfg)))
    except FatalError as e:
        print(f"fatal: {e.message}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
