"""The names of the files inside a head's state dir and a scheduler's work dir, in one place."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StateDir:
    """The head's --state-dir: its database, where it listens, the cluster token, the proxy's files."""
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def db(self) -> Path:
        return self.root / "state.db"

    @property
    def head_json(self) -> Path:
        """Where the head's gRPC server and its proxy's HTTP server listen (read by the CLI and tests)."""
        return self.root / "head.json"

    @property
    def cluster_token(self) -> Path:
        return self.root / "cluster-token"

    @property
    def api_keys(self) -> Path:
        """The 0600 file of API keys the head hands to the proxy it starts."""
        return self.root / "api-keys"

    @property
    def admin_keys(self) -> Path:
        """The 0600 file of dashboard admin keys the head hands to the proxy it starts."""
        return self.root / "admin-keys"

    @property
    def proxy_port(self) -> Path:
        return self.root / "proxy.port"

    @property
    def head_log(self) -> Path:
        """Where `gridserve up` sends the head's (and its proxy's) stderr."""
        return self.root / "head.log"


@dataclass(frozen=True)
class WorkDir:
    """A scheduler's --work-dir: one log and one port file per replica it runs."""
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run(self) -> Path:
        return self.root / "run"

    def replica_log(self, replica_id: str) -> Path:
        return self.logs / f"{replica_id}.log"

    def replica_port(self, replica_id: str) -> Path:
        return self.run / f"{replica_id}.port"

    @property
    def scheduler_log(self) -> Path:
        """Where `gridserve up` sends the scheduler's stderr."""
        return self.root / "scheduler.log"

    def create(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.run.mkdir(parents=True, exist_ok=True)
