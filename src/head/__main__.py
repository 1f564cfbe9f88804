"""Entry point of the head: `python -m gridserve.head --host ... --grpc-port ... --state-dir ...`."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path

from gridserve.common.model_config import load_model_catalog
from gridserve.common.grpcutil import SERVING, add_health, bind, make_server
from gridserve.common.eventlog import event
from gridserve.common.procs import run_service
from gridserve.common.api_key_files import KEY_FILE_NAME, write_key_file
from gridserve.head.settings import HeadConfig, parse_config
from gridserve.head.controller import Controller
from gridserve.head.route_table import RouteTable
from gridserve.head.grpc_services import add_services
from gridserve.head.state import StateStore
from gridserve.head.proxy_supervisor import ProxySupervisor, display_host, write_json_atomic

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


async def serve(cfg: HeadConfig) -> int:
    catalog = load_model_catalog(cfg.model_configs)
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    store = StateStore(cfg.state_dir)
    routes = RouteTable()
    ctl = Controller(catalog, store, routes, cfg.node_timeout, cfg.reconcile_interval,
                     max_replicas=cfg.max_replicas)
    server = make_server(cfg.security)
    add_services(server, ctl, routes)
    health = add_health(server)
    tasks: list[asyncio.Task] = []
    info = None
    try:
        ctl.load()
        ctl.reconcile()
        try:
            port = bind(server, cfg.host, cfg.grpc_port, cfg.security)
        except (OSError, RuntimeError):
            print(f"fatal: cannot bind the head's gRPC server to {cfg.host}:{cfg.grpc_port}: "
                  f"address in use or not available", file=sys.stderr)
            return 1
        await server.start()
        await health.set("", SERVING)
        info_path = cfg.state_dir / "head.json"
        previous_proxy = HeadInfo.previous_proxy_pid(info_path)
        info = HeadInfo(info_path, f"{display_host(cfg.host)}:{port}")
        info.write()
        event(log, "head_started", grpc_address=info.data["grpc_address"], state_dir=cfg.state_dir,
              models=len(catalog.models), proxy=cfg.proxy, api_keys=len(cfg.api_keys), tls=cfg.security.tls,
              cluster_token_file=cfg.security.token_file or "(given on the command line)")
        print(f"cluster token: {cfg.security.token_file or '(from --cluster-token)'}; give it to every scheduler "
              f"with --cluster-token-file (copy the file to each machine)", file=sys.stderr, flush=True)
        tasks.append(asyncio.create_task(ctl.run(), name="reconcile"))
        if cfg.proxy:
            tasks.append(asyncio.create_task(_proxy(cfg, port, ctl, info).run(adopt_pid=previous_proxy),
                                             name="proxy"))
        await _until_signal(tasks)
        return 0
    finally:
        ctl.stopping = True
        for t in reversed(tasks):  # the proxy first: its supervisor stops it in its finally
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await server.stop(grace=1.0)
        store.close()
        if info is not None:
            info.remove()
        event(log, "head_stopped")


def _proxy(cfg: HeadConfig, grpc_port: int, ctl: Controller, info: HeadInfo) -> ProxySupervisor:
    def on_change(address: str, pid: int, restarts: int) -> None:
        ctl.proxy_address, ctl.proxy_pid, ctl.proxy_restarts = address, pid, restarts
        info.set_proxy(address, pid)

    key_file = cfg.state_dir / KEY_FILE_NAME
    write_key_file(key_file, cfg.api_keys)  # 0600; removed when the head has no keys
    return ProxySupervisor(f"{cfg.local_host}:{grpc_port}", cfg.http_host, cfg.http_port, cfg.state_dir,
                           on_change, key_file if cfg.api_keys else None, cfg.security.child_args())


async def _until_signal(tasks: list[asyncio.Task]) -> None:
    """Waits for SIGTERM/SIGINT (or a background task dying, which is logged)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({stopper, *tasks}, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not stopper and not t.cancelled() and t.exception():
                event(log, "task_failed", logging.ERROR, task=t.get_name(), error=repr(t.exception()))
        event(log, "head_stopping", signal=stop.is_set())
    finally:
        stopper.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> int:
    return run_service("head", parse_config, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
