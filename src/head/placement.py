"""Pure placement rules: which node gets a new replica, which replicas go on scale-down, why some wait."""
from __future__ import annotations

from dataclasses import dataclass

from gridserve.v1 import head_pb2

EPS = 1e-9

# Scale-down removes the least useful replicas first: failed, never started, restarting, ... ready last.
REMOVAL_ORDER = {
    head_pb2.REPLICA_STATE_FAILED: 0,
    head_pb2.REPLICA_STATE_STOPPING: 1,
    head_pb2.REPLICA_STATE_UNSPECIFIED: 2,
    head_pb2.REPLICA_STATE_PENDING: 2,
    head_pb2.REPLICA_STATE_RESTARTING: 3,
    head_pb2.REPLICA_STATE_UNHEALTHY: 4,
    head_pb2.REPLICA_STATE_STARTING: 5,
    head_pb2.REPLICA_STATE_READY: 6,
}


@dataclass(frozen=True)
class NodeCapacity:
    """What placement needs to know about one alive node: its capacity and what is placed on it."""
    node_id: str
    num_cpus: float
    num_gpus: float
    used_cpus: float = 0.0
    used_gpus: float = 0.0
    memory_bytes: int = 0  # what replicas may take on it (0: not reported, memory is not checked)
    used_memory: int = 0

    @property
    def free_memory(self) -> int:
        return self.memory_bytes - self.used_memory

    @property
    def free_cpus(self) -> float:
        return self.num_cpus - self.used_cpus

    @property
    def free_gpus(self) -> float:
        return self.num_gpus - self.used_gpus

    def fits(self, cpus: float, gpus: float, memory: int = 0) -> bool:
        fits_memory = not memory or not self.memory_bytes or self.free_memory >= memory
        return self.free_cpus + EPS >= cpus and self.free_gpus + EPS >= gpus and fits_memory

    def plus(self, cpus: float, gpus: float, memory: int = 0) -> "NodeCapacity":
        return NodeCapacity(self.node_id, self.num_cpus, self.num_gpus, self.used_cpus + cpus,
                            self.used_gpus + gpus, self.memory_bytes, self.used_memory + memory)


@dataclass(frozen=True)
class ReplicaView:
    """A placed replica as scale-down sees it: its state and when it was created."""
    replica_id: str
    state: int
    created: float = 0.0


def _amount(n: float, unit: str) -> str:
    text = f"{n:g}"
    return f"{text} free {unit}" + ("" if n == 1 else "s")


def pending_message(pending: int, cpus: float, gpus: float, node: str = "", node_alive: bool = True,
                    memory_mb: int = 0) -> str:
    """Why `pending` replicas wait: '1 replica(s) pending: no alive node has 4 free CPUs and 1 free GPU'
    (and '1200 MiB free memory' when the model sets resources.memory_mb; or, pinned, 'node n1 does not have
    ...' / 'node n1 is not alive')."""
    need = _amount(cpus, "CPU")
    if gpus > 0:
        need += " and " + _amount(gpus, "GPU")
    if memory_mb > 0:
        need += f" and {memory_mb} MiB free memory"
    if node and not node_alive:
        return f"{pending} replica(s) pending: node {node} (pinned) is not alive"
    if node:
        return f"{pending} replica(s) pending: node {node} (pinned) does not have {need}"
    return f"{pending} replica(s) pending: no alive node has {need}"


def place(nodes: list[NodeCapacity], cpus: float, gpus: float, count: int,
          memory: int = 0) -> tuple[list[str], list[NodeCapacity]]:
    """Chooses a node for each of `count` new replicas (each taking `memory` bytes), most free first
    (spreading); returns the chosen node ids (fewer than `count` when nothing fits) and the nodes with
    those replicas added."""
    nodes = list(nodes)
    chosen: list[str] = []
    for _ in range(count):
        fitting = [i for i, n in enumerate(nodes) if n.fits(cpus, gpus, memory)]
        if not fitting:
            break
        best = min(fitting, key=lambda i: (-nodes[i].free_cpus, -nodes[i].free_gpus, nodes[i].node_id))
        chosen.append(nodes[best].node_id)
        nodes[best] = nodes[best].plus(cpus, gpus, memory)
    return chosen, nodes


def choose_removals(replicas: list[ReplicaView], count: int) -> list[str]:
    """The `count` replicas to remove on scale-down: non-ready first, then the newest."""
    ranked = sorted(replicas, key=lambda r: (REMOVAL_ORDER.get(r.state, 2), -r.created, r.replica_id))
    return [r.replica_id for r in ranked[:max(count, 0)]]
