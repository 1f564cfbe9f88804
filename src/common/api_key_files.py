"""API keys and dashboard admin keys of the HTTP proxy: the flags, reading key files, and the 0600 files the
head hands to its proxy."""
from __future__ import annotations

import argparse
from pathlib import Path

from gridserve.common.errors import ConfigError
from gridserve.common.files import write_atomic
from gridserve.common.paths import StateDir

MIN_KEY_LENGTH = 8


def add_api_key_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("API keys (when any is set, /v1/* needs Authorization: Bearer <key>)")
    g.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="an accepted API key; repeatable (prefer --api-key-file: a flag is visible in `ps`)")
    g.add_argument("--api-key-file", action="append", default=[], metavar="PATH",
                   help="a file of accepted API keys, one per line ('#' starts a comment); repeatable")


def check_key(key: str, where: str) -> str:
    if len(key) < MIN_KEY_LENGTH or any(c.isspace() for c in key) or not key.isprintable():
        raise ConfigError(f"{where}: an API key must be at least {MIN_KEY_LENGTH} printable characters "
                          f"without spaces")
    return key


def read_key_file(path: str | Path, flag: str = "--api-key-file") -> list[str]:
    """The keys in a file, one per line; blank lines and '#' comments are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{flag} {path}: {getattr(e, 'strerror', None) or e}") from None
    keys = [line.strip() for line in text.splitlines()]
    keys = [check_key(k, f"{flag} {path}") for k in keys if k and not k.startswith("#")]
    if not keys:
        raise ConfigError(f"{flag} {path}: the file holds no key")
    return keys


def keys_from_args(args: argparse.Namespace) -> tuple[str, ...]:
    """Every key given by --api-key and --api-key-file, without duplicates, in order."""
    keys = [check_key(k.strip(), "--api-key") for k in args.api_key]
    for path in args.api_key_file:
        keys += read_key_file(path)
    return tuple(dict.fromkeys(keys))


def add_admin_key_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--admin-key-file", action="append", default=[], metavar="PATH",
                        help="a file of dashboard admin keys, one per line: only they may deploy, scale and "
                             "undeploy from /dashboard (separate from API keys; none: dashboard actions are off)")


def admin_keys_from_args(args: argparse.Namespace) -> tuple[str, ...]:
    """Every admin key given by --admin-key-file, without duplicates, in order."""
    keys: list[str] = []
    for path in args.admin_key_file:
        keys += read_key_file(path, "--admin-key-file")
    return tuple(dict.fromkeys(keys))


def admin_key_args(state_dir: Path, keys: tuple[str, ...]) -> list[str]:
    """The head's admin keys written 0600 under its state dir (removed when none), as the proxy's flag."""
    path = StateDir(state_dir).admin_keys
    write_key_file(path, keys)
    return ["--admin-key-file", str(path)] if keys else []


def write_key_file(path: Path, keys: tuple[str, ...] | list[str]) -> None:
    """Writes the keys readable by their owner only (0600), atomically; removes the file when there are none."""
    if not keys:
        path.unlink(missing_ok=True)
        return
    write_atomic(path, "".join(f"{k}\n" for k in keys), private=True)
