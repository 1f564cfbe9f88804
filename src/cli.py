"""The `gridserve` command: run a role (head, scheduler, replica, proxy), manage deployments, or `up`."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from google.protobuf import json_format

from gridserve.common.procs import python_module_cmd, stop_sync, tied_child_env
from gridserve.v1 import head_pb2

DEFAULT_HEAD = "127.0.0.1:50051"
ROLES = {
    "head": "the head controller (deployments, placement, routes; starts the HTTP proxy)",
    "scheduler": "a node scheduler (one per machine; runs the replicas the head places)",
    "replica": "one model replica process (normally started by a scheduler)",
    "proxy": "the HTTP proxy (normally started by the head)",
}
RPC_TIMEOUT = 10.0


class CliError(Exception):
    """A failure to show as one line on stderr, exit code 1."""


# talking to the head

def call_head(head: str, method: str, request):
    """One AdminService call; a head that cannot be reached or an RPC error becomes a CliError."""
    import grpc

    from gridserve.v1 import head_pb2_grpc

    ch = grpc.insecure_channel(head)
    try:
        return getattr(head_pb2_grpc.AdminServiceStub(ch), method)(request, timeout=RPC_TIMEOUT)
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or str(code)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise CliError(f"cannot reach the head at {head}: {details}") from None
        raise CliError(f"error: {details}") from None
    finally:
        ch.close()


# status rendering

STATE_NAMES = {v: k.removeprefix("REPLICA_STATE_") for k, v in head_pb2.ReplicaState.items()}


def _num(x: float) -> str:
    return f"{x:g}"


def _mem(n: int) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit in ("B", "KiB") else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart; the last column is not padded."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [headers, *rows]]
    return "\n".join(lines)


def render_status(st: head_pb2.ClusterStatus) -> str:
    """The human view of a ClusterStatus: nodes, deployments, replicas, proxy."""
    out = []
    nodes = [[n.node_id, n.address or "-", f"{_num(n.allocated.num_cpus)}/{_num(n.capacity.num_cpus)}",
              f"{_num(n.allocated.num_gpus)}/{_num(n.capacity.num_gpus)}", _mem(n.available.memory_bytes),
              "yes" if n.alive else "no"] for n in st.nodes]
    out += ["NODES", table(["NODE", "ADDRESS", "CPUS", "GPUS", "MEM FREE", "ALIVE"], nodes) if nodes else "(none)"]
    deps = [[d.model, f"{d.ready}/{d.replicas}", d.message or "-"] for d in st.deployments]
    out += ["", "DEPLOYMENTS", table(["MODEL", "READY", "MESSAGE"], deps) if deps else "(none)"]
    reps = [[r.replica_id, r.model, r.node_id or "-", r.address or "-", STATE_NAMES.get(r.state, str(r.state)),
             str(r.restarts), r.message or "-"] for r in st.replicas]
    out += ["", "REPLICAS",
            table(["REPLICA", "MODEL", "NODE", "ADDRESS", "STATE", "RESTARTS", "MESSAGE"], reps) if reps else "(none)"]
    proxy = (f"{st.proxy_address or '(not listening)'} pid={st.proxy_pid or '-'} restarts={st.proxy_restarts}"
             if st.proxy_pid or st.proxy_address else "(not running)")
    out += ["", f"PROXY  {proxy}", f"ROUTES version {st.routes_version}"]
    return "\n".join(out)


def status_json(st: head_pb2.ClusterStatus) -> str:
    return json.dumps(json_format.MessageToDict(st, preserving_proto_field_name=True,
                                                always_print_fields_with_no_presence=True), indent=2)


# subcommands

def cmd_deploy(args) -> int:
    resp = call_head(args.head, "Deploy", head_pb2.DeployRequest(model=args.model, replicas=args.replicas))
    print(resp.message)
    return 0


def cmd_undeploy(args) -> int:
    resp = call_head(args.head, "Undeploy", head_pb2.UndeployRequest(model=args.model))
    print(resp.message)
    return 0


def cmd_status(args) -> int:
    st = call_head(args.head, "Status", head_pb2.StatusRequest())
    print(status_json(st) if args.output == "json" else render_status(st))
    return 0


# gridserve up: a local cluster in the foreground

class LocalCluster:
    """The processes `gridserve up` started; stopped scheduler first (it stops its replicas), then the head
    (it stops the proxy)."""

    def __init__(self) -> None:
        self.procs: dict[str, tuple[subprocess.Popen, Path]] = {}

    def spawn(self, name: str, module: str, argv: list[str], log_path: Path) -> subprocess.Popen:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(python_module_cmd(module, *argv), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, process_group=0, env=tied_child_env())
        self.procs[name] = (proc, log_path)
        return proc

    def check(self) -> None:
        """Raises CliError naming the first child that has exited, with the end of its log."""
        for name, (proc, log_path) in self.procs.items():
            if proc.poll() is not None:
                raise CliError(f"the {name} exited (code {proc.returncode}); last lines of {log_path}:\n"
                               + log_tail(log_path))

    def stop(self) -> None:
        for name in sorted(self.procs, key=lambda n: n == "head"):
            proc, _ = self.procs[name]
            if proc.poll() is None:
                print(f"stopping the {name} (pid {proc.pid}) ...", flush=True)
            stop_sync(proc, grace=30.0 if name == "scheduler" else 15.0)
        self.procs.clear()


def log_tail(path: Path, lines: int = 8) -> str:
    try:
        rows = path.read_text(errors="replace").splitlines()
    except OSError:
        return "  (no log)"
    return "\n".join(f"  {r}" for r in rows[-lines:]) or "  (empty log)"


def port_in_use(host: str, port: int) -> bool:
    """True if something listens on host:port (SO_REUSEADDR so sockets in TIME_WAIT do not count)."""
    if port == 0:
        return False
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_up(args) -> int:
    from gridserve.common.config import load_model_catalog
    from gridserve.common.errors import ConfigError

    try:
        catalog = load_model_catalog(args.model_configs or None)
    except ConfigError as e:
        raise CliError(f"error: {e.message}") from None
    model = args.model or catalog.default_model
    if catalog.get(model) is None:
        raise CliError(f"error: model {model!r} is not in {catalog.path} (known: {', '.join(sorted(catalog.models))})")
    for flag, port in (("--grpc-port", args.grpc_port), ("--http-port", args.http_port)):
        if port_in_use(args.host, port):
            raise CliError(f"error: port {port} on {args.host} is already in use "
                           f"(is another gridserve running? pick another {flag})")
    # Explicit handlers: SIGTERM, and SIGINT even where it was inherited as ignored (a background job).
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    cluster = LocalCluster()
    try:
        head = start_head(cluster, args)
        start_scheduler(cluster, args, head)
        print(call_head(head, "Deploy", head_pb2.DeployRequest(model=model, replicas=args.replicas)).message,
              flush=True)
        wait_model_ready(cluster, head, model, args.timeout)
        http = wait_head_json(cluster, Path(args.state_dir), "http_address", 60.0)["http_address"]
        print_ready(model, head, http)
        while True:
            time.sleep(0.5)
            cluster.check()
    except KeyboardInterrupt:
        print("\nshutting down ...", flush=True)
        return 0
    finally:
        try:
            cluster.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def start_head(cluster: LocalCluster, args) -> str:
    state = Path(args.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    (state / "head.json").unlink(missing_ok=True)
    argv = ["--host", args.host, "--grpc-port", str(args.grpc_port), "--http-host", args.host,
            "--http-port", str(args.http_port), "--state-dir", str(state)]
    if args.model_configs:
        argv += ["--model-configs", args.model_configs]
    proc = cluster.spawn("head", "gridserve.head", argv, state / "head.log")
    print(f"starting the head on {args.host}:{args.grpc_port} (pid {proc.pid}, log {state / 'head.log'})", flush=True)
    return wait_head_json(cluster, state, "grpc_address", 60.0)["grpc_address"]


def wait_head_json(cluster: LocalCluster, state: Path, key: str, timeout: float) -> dict:
    """Waits until the head (the one we started) has written `key` into head.json."""
    deadline = time.monotonic() + timeout
    pid = cluster.procs["head"][0].pid
    while time.monotonic() < deadline:
        cluster.check()
        try:
            info = json.loads((state / "head.json").read_text())
            if info.get("pid") == pid and info.get(key):
                return info
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise CliError(f"error: the head did not report its {key} within {timeout:g}s (see {state / 'head.log'})")


def start_scheduler(cluster: LocalCluster, args, head: str) -> None:
    work = Path(args.work_dir)
    argv = ["--head", head, "--host", args.host, "--work-dir", str(work)]
    if args.num_cpus is not None:
        argv += ["--num-cpus", f"{args.num_cpus:g}"]
    proc = cluster.spawn("scheduler", "gridserve.scheduler", argv, work / "scheduler.log")
    print(f"starting a scheduler (pid {proc.pid}, log {work / 'scheduler.log'})", flush=True)
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        cluster.check()
        if any(n.alive for n in call_head(head, "Status", head_pb2.StatusRequest()).nodes):
            return
        time.sleep(0.2)
    raise CliError(f"error: the scheduler did not register with the head within 60s (see {work / 'scheduler.log'})")


def wait_model_ready(cluster: LocalCluster, head: str, model: str, timeout: float) -> None:
    """Polls Status until a replica of `model` is READY, printing a line whenever something changes."""
    started = time.monotonic()
    last, last_print = None, 0.0
    while time.monotonic() - started < timeout:
        cluster.check()
        st = call_head(head, "Status", head_pb2.StatusRequest())
        mine = [r for r in st.replicas if r.model == model]
        dep = next((d for d in st.deployments if d.model == model), None)
        if any(r.state == head_pb2.REPLICA_STATE_READY for r in mine):
            return
        if mine and all(r.state == head_pb2.REPLICA_STATE_FAILED for r in mine):
            raise CliError(f"error: {model} failed to start: {mine[0].message}")
        now = tuple((r.replica_id, r.state, r.message) for r in mine) + ((dep.message,) if dep else ())
        elapsed = time.monotonic() - started
        if now != last or elapsed - last_print >= 15:
            detail = ", ".join(f"{r.replica_id} {STATE_NAMES.get(r.state, '?')}" for r in mine) or "placing"
            extra = f"; {dep.message}" if dep and dep.message else ""
            print(f"loading {model} ... ({detail}{extra}) {elapsed:.0f}s", flush=True)
            last, last_print = now, elapsed
        time.sleep(0.5)
    raise CliError(f"error: {model} was not READY within {timeout:g}s (see `gridserve status --head {head}`)")


def print_ready(model: str, head: str, http: str) -> None:
    head_flag = "" if head == DEFAULT_HEAD else f" --head {head}"
    print(f"\n{model} is ready. Try:\n"
          f"  curl -N -X POST http://{http}/v1/chat/{model} -d \"What is the capital of France?\"\n"
          f"  gridserve status{head_flag}\n"
          f"Press Ctrl-C to stop the cluster.", flush=True)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gridserve", description="A distributed model-serving cluster.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for role, text in ROLES.items():
        sub.add_parser(role, help=f"run {text}; see `gridserve {role} --help`", add_help=False)

    def admin(name: str, help_text: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("--head", default=DEFAULT_HEAD, help=f"the head's gRPC address (default {DEFAULT_HEAD})")
        return sp

    sp = admin("deploy", "deploy a model from the catalog, or change its replica count")
    sp.add_argument("model", help="model name from model_configs.json")
    sp.add_argument("--replicas", type=positive_int, default=1, help="desired replicas (default 1)")
    sp.set_defaults(func=cmd_deploy)
    sp = admin("undeploy", "remove a deployment and stop its replicas")
    sp.add_argument("model")
    sp.set_defaults(func=cmd_undeploy)
    sp = admin("status", "show nodes, deployments and replicas")
    sp.add_argument("--output", "-o", choices=("table", "json"), default="table", help="output format")
    sp.set_defaults(func=cmd_status)
    add_up_parser(sub)
    return p


def add_up_parser(sub) -> None:
    sp = sub.add_parser("up", help="start a local cluster (head, proxy, one scheduler) and deploy a model",
                        description="Start a head (which starts the proxy) and one local scheduler, deploy a "
                                    "model, wait until it is READY, then stay in the foreground; Ctrl-C stops "
                                    "everything.")
    sp.add_argument("--model", default="", help="model to deploy (default: the catalog's default_model)")
    sp.add_argument("--replicas", type=positive_int, default=1, help="replicas to deploy (default 1)")
    sp.add_argument("--host", default="127.0.0.1", help="bind address of every process (default 127.0.0.1)")
    sp.add_argument("--grpc-port", type=int, default=50051, help="the head's gRPC port (default 50051)")
    sp.add_argument("--http-port", type=int, default=8000, help="the proxy's HTTP port (default 8000)")
    sp.add_argument("--state-dir", default=".gridserve/state", help="head state (default ./.gridserve/state)")
    sp.add_argument("--work-dir", default=".gridserve/node", help="scheduler work dir (default ./.gridserve/node)")
    sp.add_argument("--num-cpus", type=positive_float, default=None, help="CPUs the local node offers (default: all)")
    sp.add_argument("--model-configs", default="", help="model catalog (default: the repo's model_configs.json)")
    sp.add_argument("--timeout", type=float, default=600.0,
                    help="seconds to wait for the model to become READY (default 600)")
    sp.set_defaults(func=cmd_up)


def run_role(role: str, argv: list[str]) -> int:
    try:
        module = importlib.import_module(f"gridserve.{role}.__main__")
    except ImportError as e:
        print(f"gridserve {role}: not available in this installation: {e}", file=sys.stderr)
        return 1
    return module.main(argv) or 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ROLES:
        return run_role(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as e:
        print(e, file=sys.stderr)
        return 1
    except OSError as e:  # a state/work dir that cannot be created, a log that cannot be opened ...
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `gridserve status | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
