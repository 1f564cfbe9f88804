"""The dead-engine path: when the engine thread dies, every open request fails at once and health drops."""
from __future__ import annotations

import asyncio
import threading

import pytest

from gridserve.common.errors import Unavailable
from gridserve.common.grpcutil import NOT_SERVING
from gridserve.common.model_config import ModelConfig
from gridserve.replica.engine import Engine, EngineError
from gridserve.replica.fake_model import load_fake
from gridserve.common.request_contract import SamplingOptions
from gridserve.replica.stall_watchdog import StallWatch


def fake_engine(tps: float = 200) -> Engine:
    cfg = ModelConfig.from_dict("fake", {"source": {"type": "fake", "tokens_per_second": tps},
                                         "context_length": 512, "max_tokens_limit": 256,
                                         "max_batch_size": 1, "max_waiting": 4})
    return Engine(load_fake(cfg))


async def test_a_dying_engine_thread_fails_running_and_waiting_requests_at_once_and_refuses_new_ones():
    engine = fake_engine()
    died = threading.Event()
    engine.on_dead = lambda reason: died.set()
    engine.start()
    try:
        ids = engine.loaded.encode_prompt("tell me a story")
        running = engine.submit("running", ids, SamplingOptions(max_tokens=256))
        waiting = engine.submit("waiting", ids, SamplingOptions(max_tokens=4))
        await running.outputs().__anext__()

        def boom(*_):
            raise RuntimeError("engine bug")
        engine.scheduler.admit = boom  # outside the per-step guard: the thread itself dies
        for handle in (running, waiting):
            with pytest.raises(EngineError, match="engine thread died .*RuntimeError: engine bug"):
                async with asyncio.timeout(2):
                    async for _ in handle.outputs():
                        pass
        assert await asyncio.to_thread(died.wait, 2)
        assert "engine bug" in engine.dead
        with pytest.raises(Unavailable, match="engine is dead"):
            engine.submit("late", ids, SamplingOptions(max_tokens=4))
        statuses = []

        async def set_health(status):
            statuses.append(status)
        assert await StallWatch(engine, 60.0, set_health).check()  # stays NOT_SERVING: never "recovered"
        assert statuses == [NOT_SERVING]
    finally:
        engine.stop()


async def test_a_failing_step_fails_its_rows_but_the_engine_lives_on():
    engine = fake_engine()
    engine.start()
    try:
        ids = engine.loaded.encode_prompt("tell me a story")
        decode = engine.runner.decode
        engine.runner.decode = lambda: (_ for _ in ()).throw(RuntimeError("bad step"))
        handle = engine.submit("a", ids, SamplingOptions(max_tokens=8))
        with pytest.raises(EngineError, match="generation failed: RuntimeError: bad step"):
            async for _ in handle.outputs():
                pass
        engine.runner.decode = decode
        outs = [o async for o in engine.submit("b", ids, SamplingOptions(max_tokens=8)).outputs()]
        assert outs[-1].finish_reason == "length" and not engine.dead
    finally:
        engine.stop()
