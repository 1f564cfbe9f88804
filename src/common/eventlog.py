"""One line per event on stderr for every process: time, role, level, event, key=value fields."""
from __future__ import annotations

import logging
import sys
import time

_ROLE = "gridserve"


class _LineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        ms = int(record.msecs)
        line = f"{ts}.{ms:03d}Z {_ROLE} {record.levelname} {record.getMessage()}"
        if record.exc_info:
            line += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        return line


def setup_logging(role: str, level: str = "INFO") -> None:
    """Route every logger of this process to stderr in the one-line format, tagged with `role`."""
    global _ROLE
    _ROLE = role
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LineFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "urllib3", "filelock", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _value(v: object) -> str:
    s = str(v)
    if not s or any(c in s for c in ' "=\n'):
        s = '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return s


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: object) -> None:
    """Log one event as `name k=v k=v` (values quoted when they hold spaces)."""
    if logger.isEnabledFor(level):
        logger.log(level, " ".join([name, *(f"{k}={_value(v)}" for k, v in fields.items())]))
