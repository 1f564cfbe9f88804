"""The dashboard's cluster view as JSON: the head's ClusterStatus joined with each READY replica's Info and
what this proxy knows of itself."""
from __future__ import annotations

import os
import time

from gridserve.proxy.cluster_metrics import ClusterCollector
from gridserve.proxy.relay import ProxyState
from gridserve.v1 import head_pb2, replica_pb2


def _resources(r: head_pb2.Resources) -> dict:
    return {"cpus": round(r.num_cpus, 2), "gpus": round(r.num_gpus, 2), "memory_bytes": r.memory_bytes}


def node_json(n: head_pb2.NodeStatus) -> dict:
    return {"node_id": n.node_id, "hostname": n.hostname, "address": n.address, "alive": n.alive,
            "last_seen": n.last_seen, "cpu_percent": round(n.cpu_percent, 1), "capacity": _resources(n.capacity),
            "allocated": _resources(n.allocated), "available": _resources(n.available)}


def deployment_json(d: head_pb2.DeploymentStatus) -> dict:
    """A deployment, with its autoscaling state (range, target, load, last decision) or null for a fixed count."""
    scaling = None
    if d.HasField("autoscaling"):
        a = d.autoscaling
        scaling = {"min": a.min_replicas, "max": a.max_replicas, "target": a.target_ongoing_requests,
                   "load": a.load, "last_decision": a.last_decision, "last_decision_at": a.last_decision_at}
    return {"model": d.model, "replicas": d.replicas, "ready": d.ready, "message": d.message, "node": d.node,
            "autoscaling": scaling}


def replica_json(r: head_pb2.ReplicaStatus, info: replica_pb2.InfoResponse | None) -> dict:
    out = {"replica_id": r.replica_id, "model": r.model, "node_id": r.node_id, "address": r.address,
           "state": head_pb2.ReplicaState.Name(r.state).removeprefix("REPLICA_STATE_"), "pid": r.pid,
           "restarts": r.restarts, "message": r.message, "since": r.state_since, "info": None}
    if info is not None:
        out["info"] = {"rss_bytes": info.rss_bytes, "running": info.running, "waiting": info.waiting,
                       "tokens_per_second": round(info.tokens_per_second, 2),
                       "seconds_since_step": round(info.seconds_since_step, 2),
                       "requests_total": info.requests_total, "max_batch_size": info.max_batch_size}
    return out


def cluster_json(collector: ClusterCollector, state: ProxyState, started: float) -> dict:
    """Everything the cluster panel shows, from the last poll (`polled_at`) and this proxy's own state."""
    st = collector.status
    watcher = state.watcher
    me = {"pid": os.getpid(), "uptime_s": round(time.time() - started, 1), "routes_version": state.table.version,
          "head_connected": bool(watcher and watcher.connected)}
    out = {"polled_at": collector.polled_at, "now": time.time(), "head_up": collector.head_up, "proxy": me,
           "nodes": [], "deployments": [], "replicas": [], "proxies": []}
    if st is None:
        return out
    out["nodes"] = [node_json(n) for n in st.nodes]
    out["deployments"] = [deployment_json(d) for d in st.deployments]
    out["replicas"] = [replica_json(r, collector.infos.get(r.replica_id)) for r in st.replicas]
    out["proxies"] = [{"address": st.proxy_address, "pid": st.proxy_pid, "restarts": st.proxy_restarts,
                       "this": st.proxy_pid == me["pid"]}] if st.proxy_address or st.proxy_pid else []
    return out
