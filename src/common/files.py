"""Small files other processes read: written atomically (tmp + rename), and the port-file format."""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_atomic(path: str | Path, text: str, private: bool = False) -> None:
    """Writes `text` so that a reader sees the old file or the whole new one, never a partial one.
    `private` makes the file readable by its owner only (0600), also when a leftover tmp file was not."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    try:
        if private:
            os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            fd = -1
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def write_port_file(path: str | Path, port: int) -> None:
    """The port a process bound, for the process that started it (which passed --port-file)."""
    write_atomic(path, f"{port}\n")


def read_port_file(path: str | Path) -> int | None:
    """The port in a port file, or None while it is missing or does not hold a valid port."""
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and 0 < int(text) < 65536 else None
