"""API keys and dashboard admin keys of the HTTP proxy: the flags, reading key files, and the 0600 files the
head hands to its proxy."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
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
                   help="a file of accepted API keys, one per line ('#' starts a comment), each optionally followed "
                        "by its rate limits, e.g. 'KEY rpm=60 tpm=10000'; repeatable")


def check_key(key: str, where: str) -> str:
    if len(key) < MIN_KEY_LENGTH or any(c.isspace() for c in key) or not key.isprintable():
        raise ConfigError(f"{where}: an API key must be at least {MIN_KEY_LENGTH} printable characters "
                          f"without spaces")
    return key


@dataclass(frozen=True)
class KeyLimits:
    """A key's rate limits: requests per minute and tokens (prompt + completion) per minute; None: no limit."""
    rpm: int | None = None
    tpm: int | None = None

    def __bool__(self) -> bool:
        return self.rpm is not None or self.tpm is not None

    def spec(self) -> str:
        """The limits as they are written after the key in a keys file ("rpm=60 tpm=10000")."""
        return " ".join(f"{name}={v}" for name, v in (("rpm", self.rpm), ("tpm", self.tpm)) if v is not None)


LIMIT_NAMES = ("rpm", "tpm")


def parse_key_line(line: str, where: str) -> tuple[str, KeyLimits]:
    """`KEY [rpm=N] [tpm=N]`: a key and its limits (positive integers)."""
    key, *fields = line.split()
    values: dict[str, int] = {}
    for f in fields:
        name, eq, value = f.partition("=")
        if name not in LIMIT_NAMES or not eq or not value.isdigit() or int(value) < 1 or name in values:
            raise ConfigError(f"{where}: after a key, only 'rpm=N' and 'tpm=N' (positive integers, once each) "
                              f"may follow, got {f!r}")
        values[name] = int(value)
    return check_key(key, where), KeyLimits(**values)


def read_key_entries(path: str | Path, flag: str = "--api-key-file") -> list[tuple[str, KeyLimits]]:
    """The keys in a file with their limits, one per line; blank lines and '#' comments are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{flag} {path}: {getattr(e, 'strerror', None) or e}") from None
    lines = [line.strip() for line in text.splitlines()]
    entries = [parse_key_line(line, f"{flag} {path}") for line in lines if line and not line.startswith("#")]
    if not entries:
        raise ConfigError(f"{flag} {path}: the file holds no key")
    return entries


def read_key_file(path: str | Path, flag: str = "--api-key-file") -> list[str]:
    """The keys in a file, one per line, without their limits (an admin key file takes none)."""
    entries = read_key_entries(path, flag)
    if flag != "--api-key-file" and any(lim for _, lim in entries):
        raise ConfigError(f"{flag} {path}: rate limits (rpm=, tpm=) belong in an --api-key-file")
    return [key for key, _ in entries]


def keys_from_args(args: argparse.Namespace) -> tuple[str, ...]:
    """Every key given by --api-key and --api-key-file, without duplicates, in order."""
    keys = [check_key(k.strip(), "--api-key") for k in args.api_key]
    for path in args.api_key_file:
        keys += read_key_file(path)
    return tuple(dict.fromkeys(keys))


def limits_from_args(args: argparse.Namespace) -> dict[str, KeyLimits]:
    """The rate limits the key files set, by key (keys without limits are left out; the last file wins)."""
    limits: dict[str, KeyLimits] = {}
    for path in args.api_key_file:
        limits.update((key, lim) for key, lim in read_key_entries(path) if lim)
    return limits


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


def write_key_file(path: Path, keys: tuple[str, ...] | list[str], limits: dict[str, KeyLimits] | None = None) -> None:
    """Writes the keys (with their limits) readable by their owner only (0600), atomically; removes the file
    when there are none."""
    if not keys:
        path.unlink(missing_ok=True)
        return
    limits = limits or {}
    lines = [f"{k} {limits[k].spec()}" if limits.get(k) else k for k in keys]
    write_atomic(path, "".join(f"{line}\n" for line in lines), private=True)
