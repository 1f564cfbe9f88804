"""The CLI's cluster commands: status, nodes, deployments, replicas, deploy, scale, undeploy, models, logs."""
from __future__ import annotations

import json
import os
import signal
import sys

from gridserve.cli import render
from gridserve.cli.headclient import CliError, call_head, stream_logs
from gridserve.v1 import head_pb2


def _status(args) -> head_pb2.ClusterStatus:
    return call_head(args.head, "Status", head_pb2.StatusRequest())


def _print(args, data, text: str) -> int:
    print(render.dumps(data) if args.output == "json" else text)
    return 0


def cmd_status(args) -> int:
    st = _status(args)
    return _print(args, render.to_dict(st), render.render_status(st))


def cmd_nodes(args) -> int:
    st = _status(args)
    return _print(args, {"nodes": [render.to_dict(n) for n in st.nodes]}, render.nodes_table(st))


def cmd_deployments(args) -> int:
    st = _status(args)
    return _print(args, {"deployments": [render.to_dict(d) for d in st.deployments]}, render.deployments_table(st))


def cmd_replicas(args) -> int:
    mine = head_pb2.ClusterStatus(replicas=[r for r in _status(args).replicas
                                            if not args.model or r.model == args.model])
    return _print(args, {"replicas": [render.to_dict(r) for r in mine.replicas]}, render.replicas_table(mine))


def autoscaling_json(args) -> str:
    """The autoscaling flags given to deploy, as the JSON object of AutoscalingConfig fields ("" if none)."""
    names = {"min_replicas": "min_replicas", "max_replicas": "max_replicas", "initial_replicas": "initial_replicas",
             "target_ongoing_requests": "target_ongoing_requests", "upscale_delay": "upscale_delay_s",
             "downscale_delay": "downscale_delay_s", "look_back_period": "look_back_period_s"}
    given = {field: getattr(args, flag) for flag, field in names.items() if getattr(args, flag, None) is not None}
    if given and args.replicas is not None:
        raise CliError("error: give --replicas (a fixed count) or autoscaling flags, not both")
    if args.replicas is not None:
        return "null"  # a fixed count: no autoscaling, whatever the catalog entry says
    return json.dumps(given) if given else ""


def cmd_deploy(args) -> int:
    resp = call_head(args.head, "Deploy", head_pb2.DeployRequest(model=args.model, replicas=args.replicas or 1,
                                                                  node=args.node or "",
                                                                  autoscaling_json=autoscaling_json(args)))
    return _print(args, {"message": resp.message}, resp.message)


def cmd_scale(args) -> int:
    resp = call_head(args.head, "Scale", head_pb2.ScaleRequest(model=args.model, replicas=args.replicas))
    return _print(args, {"message": resp.message}, resp.message)


def cmd_undeploy(args) -> int:
    resp = call_head(args.head, "Undeploy", head_pb2.UndeployRequest(model=args.model))
    return _print(args, {"message": resp.message}, resp.message)


def cmd_models(args) -> int:
    """The catalog (with the nodes whose HF cache holds each hub model), then every node's cached hub models."""
    data = render.models_data(call_head(args.head, "Models", head_pb2.ModelsRequest()))
    data["node_caches"] = render.node_caches(_status(args))
    text = f"{render.models_table(data)}\n\nNODE CACHES (Hugging Face)\n{render.node_caches_table(data['node_caches'])}"
    return _print(args, data, text)


def cmd_logs(args) -> int:
    """Copies the log to stdout as it arrives; with --output json, one {"replica", "line"} object per line."""
    request = head_pb2.LogsRequest(replica_id=args.replica, follow=args.follow, tail_lines=args.tail,
                                   node=args.node or "")
    out = sys.stdout.buffer
    pending = b""
    if args.follow:  # Ctrl-C is how --follow ends: leave at once, whatever gRPC is doing in the stream
        signal.signal(signal.SIGINT, _exit_on_interrupt)
    for data in stream_logs(args.head, request):
        if args.output != "json":
            out.write(data)
            out.flush()
            continue
        lines = (pending + data).split(b"\n")
        pending = lines.pop()
        for line in lines:
            _json_line(args.replica, line)
    if pending:
        _json_line(args.replica, pending)
    return 0


def _exit_on_interrupt(signum, frame) -> None:
    """Unwinding a sync gRPC stream on KeyboardInterrupt could hang the CLI at exit (seen once in CI)."""
    try:
        sys.stdout.flush()
    finally:
        os._exit(130)


def _json_line(replica: str, line: bytes) -> None:
    print(json.dumps({"replica": replica, "line": line.decode("utf-8", "replace")}), flush=True)
