"""How the CLI shows things: aligned tables for people, JSON (`--output json`) for programs."""
from __future__ import annotations

import json
import time

from google.protobuf import json_format

from gridserve.common.model_config_proto import config_to_dict
from gridserve.v1 import head_pb2

STATE_NAMES = {v: k.removeprefix("REPLICA_STATE_") for k, v in head_pb2.ReplicaState.items()}


def num(x: float) -> str:
    return f"{x:g}"


def mem(n: int | float) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit in ("B", "KiB") else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def ago(unix: float) -> str:
    if not unix:
        return "-"
    s = max(0, int(time.time() - unix))
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h"


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart; the last column is not padded."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [headers, *rows]]
    return "\n".join(lines)


def table_or_none(headers: list[str], rows: list[list[str]]) -> str:
    return table(headers, rows) if rows else "(none)"


def to_dict(msg) -> dict:
    """A proto message as JSON-ready data: proto field names, zero values kept, enums by name."""
    return json_format.MessageToDict(msg, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def dumps(data) -> str:
    return json.dumps(data, indent=2)


# the cluster, as the head's Status tells it

def nodes_table(st: head_pb2.ClusterStatus) -> str:
    rows = [[n.node_id, n.address or "-", f"{num(n.allocated.num_cpus)}/{num(n.capacity.num_cpus)}",
             f"{num(n.allocated.num_gpus)}/{num(n.capacity.num_gpus)}", mem(n.available.memory_bytes),
             "yes" if n.alive else "no", ago(n.last_seen)] for n in st.nodes]
    return table_or_none(["NODE", "ADDRESS", "CPUS", "GPUS", "MEM FREE", "ALIVE", "SEEN"], rows)


def deployments_table(st: head_pb2.ClusterStatus) -> str:
    rows = [[d.model, f"{d.ready}/{d.replicas}", d.node or "-", d.message or "-"] for d in st.deployments]
    return table_or_none(["MODEL", "READY", "NODE", "MESSAGE"], rows)


def autoscaling_table(st: head_pb2.ClusterStatus) -> str:
    """The autoscaled deployments: ready (current), target, range, load and the last decision with its reason."""
    rows = [[d.model, str(d.ready), str(d.replicas), str(d.autoscaling.min_replicas),
             str(d.autoscaling.max_replicas), num(d.autoscaling.target_ongoing_requests), f"{d.autoscaling.load:g}",
             ago(d.autoscaling.last_decision_at), d.autoscaling.last_decision or "-"]
            for d in st.deployments if d.HasField("autoscaling")]
    return table(["MODEL", "CURRENT", "TARGET", "MIN", "MAX", "PER REPLICA", "LOAD", "DECIDED", "LAST DECISION"],
                 rows) if rows else ""


def state_text(r: head_pb2.ReplicaStatus) -> str:
    """The state, and while a STARTING replica fills the HF cache, how far: 'STARTING (downloading 45%, 12.0MiB/s)'."""
    name = STATE_NAMES.get(r.state, str(r.state))
    d = r.download
    if r.state != head_pb2.REPLICA_STATE_STARTING or not r.HasField("download"):
        return name
    done = f"{100 * d.done_bytes / d.total_bytes:.0f}%" if d.total_bytes else mem(d.done_bytes) or "0B"
    speed = f", {mem(d.bytes_per_second)}/s" if d.bytes_per_second >= 1 else ""
    return f"{name} (downloading {done}{speed})"


def memory_text(r: head_pb2.ReplicaStatus) -> str:
    """RSS and the limit it is held to: '412.3MiB/1.2GiB' ('-' when not running)."""
    if not r.rss_bytes:
        return "-"
    return mem(r.rss_bytes) + (f"/{mem(r.memory_limit_bytes)}" if r.memory_limit_bytes else "")


def message_text(r: head_pb2.ReplicaStatus) -> str:
    """Its message; when it has none, why it was last restarted ('last restart: killed by SIGKILL: over ...')."""
    return r.message or (f"last restart: {r.last_restart}" if r.last_restart else "-")


def replicas_table(st: head_pb2.ClusterStatus) -> str:
    rows = [[r.replica_id, r.model, r.node_id or "-", r.address or "-", state_text(r), memory_text(r),
             mem(r.gpu_bytes), str(r.restarts), ago(r.state_since), message_text(r)] for r in st.replicas]
    return table_or_none(["REPLICA", "MODEL", "NODE", "ADDRESS", "STATE", "MEM", "GPU MEM", "RESTARTS", "SINCE",
                          "MESSAGE"], rows)


def render_status(st: head_pb2.ClusterStatus) -> str:
    """The human view of a ClusterStatus: nodes, deployments, replicas, proxy."""
    proxy = (f"{st.proxy_address or '(not listening)'} pid={st.proxy_pid or '-'} restarts={st.proxy_restarts}"
             if st.proxy_pid or st.proxy_address else "(not running)")
    scaling = autoscaling_table(st)
    return "\n".join(["NODES", nodes_table(st), "", "DEPLOYMENTS", deployments_table(st), "",
                      *(["AUTOSCALING", scaling, ""] if scaling else []),
                      "REPLICAS", replicas_table(st), "", f"PROXY  {proxy}", f"ROUTES version {st.routes_version}"])


def status_json(st: head_pb2.ClusterStatus) -> str:
    return dumps(to_dict(st))


# the catalog, as the head's Models tells it

def models_data(resp: head_pb2.ModelsResponse) -> dict:
    models = []
    for m in resp.models:
        config = config_to_dict(m.model_config)
        models.append({"name": m.name, "default": m.is_default, "deployed": m.deployed, "replicas": m.replicas,
                       "ready": m.ready, "cached_on": list(m.cached_on), "config": config})
    return {"catalog_path": resp.catalog_path, "models": models}


def models_table(data: dict) -> str:
    rows = []
    for m in data["models"]:
        c, res = m["config"], m["config"]["resources"]
        deployed = f"{m['ready']}/{m['replicas']}" if m["deployed"] else "-"
        rows.append([m["name"] + (" *" if m["default"] else ""), deployed, num(res["num_cpus"]),
                     num(res["num_gpus"]), mem(res["memory_mb"] * 1024 * 1024), str(c["context_length"]),
                     ",".join(m.get("cached_on", [])) or "-", c.get("description") or "-"])
    out = table_or_none(["MODEL", "DEPLOYED", "CPUS", "GPUS", "MEMORY", "CONTEXT", "CACHED ON", "DESCRIPTION"], rows)
    return f"{out}\n(* the default model; catalog {data['catalog_path'] or '-'})"


def node_caches(st: head_pb2.ClusterStatus) -> list[dict]:
    """Every hub model in every node's HF cache: node, repo, size, revisions and refs."""
    return [{"node": n.node_id, "repo": c.repo, "size_bytes": c.size_bytes, "revisions": list(c.revisions),
             "refs": list(c.refs)} for n in st.nodes for c in n.cached_models]


def node_caches_table(caches: list[dict]) -> str:
    rows = [[c["node"], c["repo"], mem(c["size_bytes"]), ",".join(c["refs"]) or "-",
             ",".join(r[:12] for r in c["revisions"]) or "-"] for c in caches]
    return table_or_none(["NODE", "CACHED MODEL", "SIZE", "REFS", "REVISIONS"], rows)
