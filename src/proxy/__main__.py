"""`python -m gridserve.proxy`: parse the flags, set up logging, run the HTTP proxy until signalled."""
from __future__ import annotations

import sys

from gridserve.common.service import run_service
from gridserve.proxy.server import serve
from gridserve.proxy.settings import parse_config


def main(argv: list[str] | None = None) -> int:
    """Exit codes in gridserve.common.service.ExitCode: 0 after a clean stop, 2 for bad flags, 3 for a
    fatal error (e.g. the port is taken)."""
    return run_service("proxy", parse_config, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
