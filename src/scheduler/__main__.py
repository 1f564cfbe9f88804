"""Entry point of a scheduler: `python -m gridserve.scheduler --head HOST:PORT --node-id ID ...`."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from gridserve.common.eventlog import event
from gridserve.common.procs import run_service
from gridserve.scheduler.head_link import NodeAgent
from gridserve.scheduler.settings import SchedulerConfig, parse_config

log = logging.getLogger("gridserve.scheduler")


async def serve(cfg: SchedulerConfig) -> int:
    (cfg.work_dir / "logs").mkdir(parents=True, exist_ok=True)
    (cfg.work_dir / "run").mkdir(parents=True, exist_ok=True)
    agent = NodeAgent(cfg)
    event(log, "scheduler_started", node=cfg.node_id, head=cfg.head, cpus=f"{cfg.num_cpus:g}",
          gpus=f"{cfg.num_gpus:g}", host=cfg.host, advertise=cfg.advertise_host, work_dir=cfg.work_dir)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    session = asyncio.create_task(agent.run(), name="session")
    try:
        await stop.wait()
        event(log, "scheduler_stopping", replicas=len(agent.replicas))
        return 0
    finally:
        # Replicas first, while the session can still report them STOPPING; then the session.
        try:
            await agent.stop_all()
        finally:
            session.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await session
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            event(log, "scheduler_stopped")


def main(argv: list[str] | None = None) -> int:
    return run_service("scheduler", parse_config, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
