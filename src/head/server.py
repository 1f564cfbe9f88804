"""The head process: its gRPC server (deployments, nodes, routes), the reconcile loop, its proxy, head.json."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from gridserve.common.errors import FatalError
from gridserve.common.files import write_json_atomic
from gridserve.common.model_config import load_model_catalog
from gridserve.common.grpcutil import SERVING, add_health, add_reflection, bind, make_server
from gridserve.common.eventlog import event
from gridserve.common.paths import StateDir
from gridserve.common.service import cancel_and_wait, Stop, run_service, stop_or_task_exit
from gridserve.common.api_key_files import admin_key_args, write_key_file
from gridserve.head.autoscaler import Autoscaler
from gridserve.head.settings import HeadConfig, parse_config
from gridserve.head.controller import Controller
from gridserve.head.route_table import RouteTable
from gridserve.head.grpc_services import SERVICE_NAMES, add_services
from gridserve.head.state import StateStore
from gridserve.common.proxy_supervisor import ProxySupervisor, display_host

log = logging.getLogger("gridserve.head")


class HeadInfo:
    """<state-dir>/head.json: where the head's gRPC server and the proxy's HTTP server listen."""

    def __init__(self, path: Path, grpc_address: str):
        self.path = path
        self.data = {"grpc_address": grpc_address, "http_address": "", "pid": os.getpid(), "proxy_pid": 0}

    @staticmethod
    def previous_proxy_pid(path: Path) -> int:
        """The proxy pid a previous head recorded (it may still run after that head was killed), else 0."""
        try:
            pid = json.loads(path.read_text()).get("proxy_pid", 0)
        except (OSError, ValueError, AttributeError):
            return 0
        return pid if isinstance(pid, int) and pid > 0 else 0

    def set_proxy(self, address: str, pid: int) -> None:
        """Records the proxy's address (kept while it restarts) and its pid (0 while none runs)."""
        new = {"http_address": address or self.data["http_address"], "proxy_pid": pid}
        if any(self.data[k] != v for k, v in new.items()):
            self.data.update(new)
            self.write()

    def write(self) -> None:
        write_json_atomic(self.path, self.data)

    def remove(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()


async def serve(cfg: HeadConfig, stop: Stop) -> int:
    """Runs the head until `stop` (SIGTERM/SIGINT) or until its reconcile loop or proxy supervisor dies."""
    catalog = load_model_catalog(cfg.model_configs)
    state_dir = StateDir(cfg.state_dir)
    state_dir.root.mkdir(parents=True, exist_ok=True)
    store = StateStore(state_dir.root)
    routes = RouteTable()
    ctl = Controller(catalog, store, routes, cfg.node_timeout, cfg.reconcile_interval,
                     max_replicas=cfg.max_replicas)
    ctl.autoscaler = Autoscaler(ctl)
    server = make_server(cfg.security)
    add_services(server, ctl, routes)
    health = add_health(server)
    add_reflection(server, *SERVICE_NAMES)
    tasks: list[asyncio.Task] = []
    info = None
    try:
        ctl.load()
        ctl.reconcile()
        try:
            port = bind(server, cfg.host, cfg.grpc_port, cfg.security)
        except (OSError, RuntimeError):
            raise FatalError(f"cannot bind the head's gRPC server to {cfg.host}:{cfg.grpc_port}: "
                             f"address in use or not available") from None
        await server.start()
        await health.set("", SERVING)
        previous_proxy = HeadInfo.previous_proxy_pid(state_dir.head_json)
        info = HeadInfo(state_dir.head_json, f"{display_host(cfg.host)}:{port}")
        info.write()
        event(log, "head_started", grpc_address=info.data["grpc_address"], state_dir=cfg.state_dir,
              models=len(catalog.models), proxy=cfg.proxy, api_keys=len(cfg.api_keys), tls=cfg.security.tls,
              cluster_token_file=cfg.security.token_file or "(given on the command line)")
        print(f"cluster token: {cfg.security.token_file or '(from --cluster-token)'}; give it to every scheduler "
              f"with --cluster-token-file (copy the file to each machine)", file=sys.stderr, flush=True)
        tasks.append(asyncio.create_task(ctl.run(), name="reconcile"))
        tasks.append(asyncio.create_task(ctl.autoscaler.run(), name="autoscaler"))
        if cfg.proxy:
            tasks.append(asyncio.create_task(_proxy(cfg, state_dir, port, ctl, info).run(adopt_pid=previous_proxy),
                                             name="proxy"))
        code = await stop_or_task_exit(stop, tasks)
        event(log, "head_stopping", signal=stop.signal)
        return code
    finally:
        ctl.stopping = True
        for t in reversed(tasks):  # the proxy first: its supervisor stops it in its finally
            await cancel_and_wait(t)
        await server.stop(grace=1.0)
        store.close()
        if info is not None:
            info.remove()
        event(log, "head_stopped")


def _proxy(cfg: HeadConfig, state_dir: StateDir, grpc_port: int, ctl: Controller, info: HeadInfo) -> ProxySupervisor:
    def on_change(address: str, pid: int, restarts: int) -> None:
        ctl.proxy_address, ctl.proxy_pid, ctl.proxy_restarts = address, pid, restarts
        info.set_proxy(address, pid)

    write_key_file(state_dir.api_keys, cfg.api_keys, cfg.api_key_limits)  # 0600; removed when the head has no keys
    return ProxySupervisor(f"{cfg.local_host}:{grpc_port}", cfg.http_host, cfg.http_port, state_dir.proxy_port,
                           on_change, state_dir.api_keys if cfg.api_keys else None,
                           cfg.security.child_args() + admin_key_args(cfg.state_dir, cfg.admin_keys))


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m gridserve.head`; exit codes in gridserve.common.service.ExitCode."""
    return run_service("head", parse_config, serve, argv)
