"""Route deltas: what changed between two routing tables, as a RoutingTable a proxy applies to the older one."""
from __future__ import annotations

from gridserve.common.model_config_proto import config_to_proto
from gridserve.v1 import head_pb2


def route_delta(old: tuple, new: tuple, base_version: int, version: int) -> head_pb2.RoutingTable:
    """The delta from `old` to `new` (canonical tuples of RouteKey): a route whose config or endpoints
    changed is listed with its added or changed endpoints and the replica ids that left; a model that
    is gone is in removed_models."""
    before = {r.model: r for r in old}
    out = head_pb2.RoutingTable(version=version, delta=True, base_version=base_version)
    for route in new:
        prev = before.pop(route.model, None)
        if prev == route:
            continue
        prev_eps = set(prev.endpoints) if prev is not None else set()
        now_eps = set(route.endpoints)
        added = sorted(now_eps - prev_eps)
        kept_ids = {e.replica_id for e in now_eps}
        removed = sorted({e.replica_id for e in prev_eps - now_eps} - kept_ids)
        out.routes.append(head_pb2.Route(
            model=route.model, model_config=config_to_proto(route.config), removed_replica_ids=removed,
            endpoints=[head_pb2.Endpoint(replica_id=e.replica_id, address=e.address, node_id=e.node_id)
                       for e in added]))
    out.removed_models.extend(sorted(before))
    return out
