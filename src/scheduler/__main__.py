"""Entry point of a scheduler: `python -m gridserve.scheduler --head HOST:PORT --node-id ID ...`."""
from __future__ import annotations

import asyncio
import logging
import sys

from gridserve.common.eventlog import event
from gridserve.common.paths import WorkDir
from gridserve.common.service import cancel_and_wait, Stop, run_service, stop_or_task_exit
from gridserve.scheduler.head_link import NodeAgent
from gridserve.scheduler.node_proxy import NodeProxy
from gridserve.scheduler.settings import SchedulerConfig, parse_config

log = logging.getLogger("gridserve.scheduler")


async def serve(cfg: SchedulerConfig, stop: Stop) -> int:
    """Runs the node agent until `stop` (SIGTERM/SIGINT); then stops the local replicas and the session."""
    WorkDir(cfg.work_dir).create()
    agent = NodeAgent(cfg)
    event(log, "scheduler_started", node=cfg.node_id, head=cfg.head, cpus=f"{cfg.num_cpus:g}",
          gpus=f"{cfg.num_gpus:g}", host=cfg.host, advertise=cfg.advertise_host, work_dir=cfg.work_dir)
    session = asyncio.create_task(agent.run(), name="session")
    tasks = [session]
    if cfg.proxy_port >= 0:
        proxy = NodeProxy(cfg.head, cfg.proxy_host, cfg.proxy_port, WorkDir(cfg.work_dir).run, cfg.security,
                          cfg.proxy_api_key_files)
        tasks.append(asyncio.create_task(proxy.run(), name="proxy"))
    try:
        code = await stop_or_task_exit(stop, tasks)
        event(log, "scheduler_stopping", signal=stop.signal, replicas=len(agent.replicas))
        return code
    finally:
        # Replicas first, while the session can still report them STOPPING; then the session.
        try:
            await agent.stop_all()
        finally:
            for task in tasks:  # the session, then the node's proxy (its supervisor stops it)
                await cancel_and_wait(task)
            event(log, "scheduler_stopped")


def main(argv: list[str] | None = None) -> int:
    """Exit codes in gridserve.common.service.ExitCode."""
    return run_service("scheduler", parse_config, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
