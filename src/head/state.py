"""The head's desired state (deployments and replica placements), written through to SQLite."""
from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from gridserve.common.autoscaling_config import AutoscalingConfig
from gridserve.common.model_config import ModelConfig
from gridserve.common.errors import ConfigError, GridserveError
from gridserve.common.eventlog import event
from gridserve.common.paths import StateDir

log = logging.getLogger("gridserve.head.state")

SCHEMA = """
CREATE TABLE IF NOT EXISTS deployments (
    model TEXT PRIMARY KEY,
    replicas INTEGER NOT NULL,
    config_json TEXT NOT NULL,
    updated REAL NOT NULL,
    node TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS assignments (
    replica_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    node_id TEXT NOT NULL,
    created REAL NOT NULL
);
"""
# Columns added after the first release; ALTER TABLE brings older state.db files up to date.
MIGRATIONS = (("deployments", "node", "ALTER TABLE deployments ADD COLUMN node TEXT NOT NULL DEFAULT ''"),
              ("deployments", "autoscaling_json",
               "ALTER TABLE deployments ADD COLUMN autoscaling_json TEXT NOT NULL DEFAULT ''"))


@dataclass
class Deployment:
    """One deployed model: how many replicas are wanted and the config they run with."""
    model: str
    replicas: int
    config: ModelConfig
    updated: float = 0.0
    node: str = ""                # pinned: replicas go only to this node
    autoscaling: AutoscalingConfig | None = None  # set: `replicas` is the autoscaler's current target


@dataclass(frozen=True)
class Assignment:
    """The head's decision that replica `replica_id` of `model` runs on `node_id`."""
    replica_id: str
    model: str
    node_id: str
    created: float


class StateStore:
    """SQLite file `<state-dir>/state.db`; every change is committed before the call returns."""

    def __init__(self, state_dir: str | Path):
        path = StateDir(state_dir).db
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        try:
            self._db = sqlite3.connect(str(path), isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            self._migrate()
        except sqlite3.Error as e:
            raise ConfigError(f"{path}: cannot open the state database: {e}") from None

    def _migrate(self) -> None:
        for table, column, statement in MIGRATIONS:
            columns = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in columns:
                self._db.execute(statement)

    def close(self) -> None:
        self._db.close()

    # deployments

    def load_deployments(self) -> dict[str, Deployment]:
        """Every stored deployment; a row whose config no longer validates is logged and skipped."""
        out: dict[str, Deployment] = {}
        rows = self._db.execute("SELECT model, replicas, config_json, updated, node, autoscaling_json FROM deployments "
                                "ORDER BY model")
        for model, replicas, config_json, updated, node, autoscaling_json in rows:
            try:
                out[model] = Deployment(model, int(replicas), ModelConfig.from_json(config_json), updated, node,
                                        AutoscalingConfig.from_json(autoscaling_json))
            except GridserveError as e:
                event(log, "state_row_skipped", logging.ERROR, model=model, error=e.message)
        return out

    def put_deployment(self, dep: Deployment) -> None:
        dep.updated = time.time()
        self._db.execute(
            "INSERT INTO deployments (model, replicas, config_json, updated, node, autoscaling_json) "
            "VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(model) DO UPDATE SET replicas=excluded.replicas, config_json=excluded.config_json, "
            "updated=excluded.updated, node=excluded.node, autoscaling_json=excluded.autoscaling_json",
            (dep.model, dep.replicas, dep.config.to_json(), dep.updated, dep.node,
             dep.autoscaling.to_json() if dep.autoscaling else ""))

    def delete_deployment(self, model: str) -> None:
        with self._tx():
            self._db.execute("DELETE FROM deployments WHERE model = ?", (model,))
            self._db.execute("DELETE FROM assignments WHERE model = ?", (model,))

    # assignments

    def load_assignments(self) -> dict[str, Assignment]:
        rows = self._db.execute("SELECT replica_id, model, node_id, created FROM assignments ORDER BY created")
        return {r[0]: Assignment(*r) for r in rows}

    def put_assignment(self, a: Assignment) -> None:
        self._db.execute("INSERT OR REPLACE INTO assignments (replica_id, model, node_id, created) "
                         "VALUES (?, ?, ?, ?)", (a.replica_id, a.model, a.node_id, a.created))

    def put_assignments(self, assignments: list[Assignment]) -> None:
        """Stores many placements in one transaction (one commit for a deploy of 10,000 replicas)."""
        if assignments:
            with self._tx():
                self._db.executemany("INSERT OR REPLACE INTO assignments (replica_id, model, node_id, created) "
                                     "VALUES (?, ?, ?, ?)", [(a.replica_id, a.model, a.node_id, a.created)
                                                             for a in assignments])

    def delete_assignments(self, replica_ids: list[str]) -> None:
        if replica_ids:
            with self._tx():
                self._db.executemany("DELETE FROM assignments WHERE replica_id = ?", [(r,) for r in replica_ids])

    def _tx(self):
        return _Transaction(self._db)


class _Transaction:
    """BEGIN ... COMMIT (ROLLBACK on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self):
        self._db.execute("BEGIN")

    def __exit__(self, exc_type, exc, tb):
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        return False
