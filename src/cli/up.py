"""`gridserve up`: a local cluster (head, proxy, one scheduler) serving a model, in the foreground."""
from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import time
from pathlib import Path

from gridserve.cli.headclient import DEFAULT_HEAD, DEFAULT_STATE_DIR, CliError, Head, call_head
from gridserve.cli.render import STATE_NAMES
from gridserve.common.paths import StateDir, WorkDir
from gridserve.common.procs import python_module_cmd, stop_sync, tied_child_env
from gridserve.common.security import security_from_args
from gridserve.v1 import head_pb2


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
    from gridserve.common.model_config import load_model_catalog
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
        # Deployed first: the head places the replica the moment the scheduler registers.
        print(call_head(head, "Deploy", head_pb2.DeployRequest(model=model, replicas=args.replicas)).message,
              flush=True)
        start_scheduler(cluster, args, head)
        wait_model_ready(cluster, head, model, args.timeout)
        http = wait_head_json(cluster, StateDir(args.state_dir), "http_address", 60.0)["http_address"]
        print_ready(model, head, http, args.state_dir, bool(args.api_key_file))
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


def start_head(cluster: LocalCluster, args) -> Head:
    state = StateDir(args.state_dir)
    state.root.mkdir(parents=True, exist_ok=True)
    state.head_json.unlink(missing_ok=True)
    argv = ["--host", args.host, "--grpc-port", str(args.grpc_port), "--http-host", args.host,
            "--http-port", str(args.http_port), "--state-dir", str(state.root)]
    if args.model_configs:
        argv += ["--model-configs", args.model_configs]
    for path in args.api_key_file:
        argv += ["--api-key-file", path]
    for path in args.admin_key_file:
        argv += ["--admin-key-file", path]
    proc = cluster.spawn("head", "gridserve.head", argv, state.head_log)
    print(f"starting the head on {args.host}:{args.grpc_port} (pid {proc.pid}, log {state.head_log})", flush=True)
    address = wait_head_json(cluster, state, "grpc_address", 60.0)["grpc_address"]
    # The head made (or reused) the cluster token in its state dir before it wrote head.json.
    return Head(address, security_from_args(security_defaults(), state_dir=state.root))


def security_defaults() -> argparse.Namespace:
    """No security flags given: the token comes from the head's state dir."""
    return argparse.Namespace(cluster_token=None, cluster_token_file=None, tls_cert=None, tls_key=None,
                              tls_ca=None)


def wait_head_json(cluster: LocalCluster, state: StateDir, key: str, timeout: float) -> dict:
    """Waits until the head (the one we started) has written `key` into head.json."""
    deadline = time.monotonic() + timeout
    pid = cluster.procs["head"][0].pid
    while time.monotonic() < deadline:
        cluster.check()
        try:
            info = json.loads(state.head_json.read_text())
            if info.get("pid") == pid and info.get(key):
                return info
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    raise CliError(f"error: the head did not report its {key} within {timeout:g}s (see {state.head_log})")


def start_scheduler(cluster: LocalCluster, args, head: Head) -> None:
    work = WorkDir(args.work_dir)
    argv = ["--head", head.address, "--host", args.host, "--work-dir", str(work.root), *head.security.child_args()]
    if args.num_cpus is not None:
        argv += ["--num-cpus", f"{args.num_cpus:g}"]
    proc = cluster.spawn("scheduler", "gridserve.scheduler", argv, work.scheduler_log)
    print(f"starting a scheduler (pid {proc.pid}, log {work.scheduler_log})", flush=True)
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        cluster.check()
        if any(n.alive for n in call_head(head, "Status", head_pb2.StatusRequest()).nodes):
            return
        time.sleep(0.2)
    raise CliError(f"error: the scheduler did not register with the head within 60s (see {work / 'scheduler.log'})")


def wait_model_ready(cluster: LocalCluster, head: Head, model: str, timeout: float) -> None:
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
        time.sleep(0.1)  # a local Status call is cheap; the curl line comes within 0.1 s of READY
    raise CliError(f"error: {model} was not READY within {timeout:g}s (see `gridserve status --head {head}`)")


def print_ready(model: str, head: Head, http: str, state_dir: str, keys: bool = False) -> None:
    head_flag = "" if head.address == DEFAULT_HEAD else f" --head {head.address}"
    if Path(state_dir).resolve() != Path(DEFAULT_STATE_DIR).resolve():
        head_flag += f" --state-dir {state_dir}"  # where the CLI finds the cluster token
    auth = ' -H "Authorization: Bearer $GRIDSERVE_API_KEY"' if keys else ""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}], "stream": True})
    print(f"\n{model} is ready. Try:\n"
          f"  curl -N -X POST http://{http}/v1/chat/{model}{auth} -d \"What is the capital of France?\"\n"
          f"  curl -N http://{http}/v1/chat/completions{auth} -H 'Content-Type: application/json' -d '{body}'\n"
          f"  gridserve status{head_flag}\n"
          f"  open http://{http}/dashboard in a browser (cluster, charts, logs, chat playground)\n"
          f"Press Ctrl-C to stop the cluster.", flush=True)
