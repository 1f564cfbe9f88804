"""Engine progress: seconds_since_step while wedged with work, and the watchdog that turns health NOT_SERVING."""
from __future__ import annotations

import asyncio
import logging
import time

import pytest
from grpc_health.v1 import health, health_pb2

from gridserve.common.grpcutil import NOT_SERVING, SERVING
from gridserve.replica.engine import Engine
from gridserve.common.request_contract import SamplingOptions
from gridserve.replica.stall_watchdog import StallWatch

PROMPT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture
def engine(tiny_loaded):
    engine = Engine(tiny_loaded, num_threads=1)
    engine.start()
    yield engine
    engine.stop()


async def finish_of(handle) -> str | None:
    return [out async for out in handle.outputs()][-1].finish_reason


async def test_seconds_since_step_is_zero_idle_and_grows_while_a_wedged_engine_has_work(tiny_loaded, engine):
    ids = tiny_loaded.encode_prompt(PROMPT)
    assert await finish_of(engine.submit("a", ids, SamplingOptions(max_tokens=2))) == "length"
    engine.wedge()
    await asyncio.sleep(0.5)
    assert engine.stats().seconds_since_step == 0  # idle is not stalled, wedged or not
    handle = engine.submit("b", ids, SamplingOptions(max_tokens=4))
    assert engine.stats().seconds_since_step < 0.25  # the clock starts when work arrives, not at the last step
    steps = engine.stats().steps_total
    await asyncio.sleep(0.6)
    stats = engine.stats()
    assert stats.seconds_since_step >= 0.5 and stats.steps_total == steps and stats.waiting == 1
    engine.wedge(False)
    assert await finish_of(handle) == "length"
    assert engine.stats().seconds_since_step == 0


async def test_a_running_stream_keeps_seconds_since_step_small_until_the_engine_wedges(tiny_loaded, engine):
    handle = engine.submit("long", tiny_loaded.encode_prompt(PROMPT), SamplingOptions(max_tokens=128))
    stream = handle.outputs()
    await stream.__anext__()
    assert engine.stats().seconds_since_step < 0.25
    engine.wedge()
    await asyncio.sleep(0.5)
    stats = engine.stats()
    assert stats.running == 1 and stats.seconds_since_step >= 0.4
    handle.cancel()


async def status(servicer, name: str = "") -> int:
    return (await servicer.Check(health_pb2.HealthCheckRequest(service=name), None)).status


async def wait_status(servicer, want: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while await status(servicer) != want:
        assert time.monotonic() < deadline, f"health never became {want}"
        await asyncio.sleep(0.02)


@pytest.fixture
async def watched(engine):
    """(health servicer, StallWatch running every 20 ms with a 0.3 s stall timeout)."""
    servicer = health.aio.HealthServicer()

    async def set_health(value: int) -> None:
        await servicer.set("", value)

    await set_health(SERVING)
    watch = StallWatch(engine, 0.3, set_health, interval_s=0.02)
    task = asyncio.create_task(watch.run())
    yield servicer, watch
    task.cancel()
    await asyncio.wait([task])


async def test_watchdog_sets_not_serving_past_the_stall_timeout_and_serving_once_steps_resume(
        tiny_loaded, engine, watched, caplog):
    servicer, watch = watched
    caplog.set_level(logging.INFO, logger="gridserve.replica")
    engine.wedge()
    await asyncio.sleep(0.5)
    assert await status(servicer) == SERVING  # wedged but idle: nothing is stuck
    handle = engine.submit("r", tiny_loaded.encode_prompt(PROMPT), SamplingOptions(max_tokens=4))
    started = time.monotonic()
    await wait_status(servicer, NOT_SERVING)
    assert time.monotonic() - started >= 0.3
    assert engine.stats().seconds_since_step > 0.3
    engine.wedge(False)
    await wait_status(servicer, SERVING)
    assert await finish_of(handle) == "length"
    events = [r.getMessage().split()[0] for r in caplog.records if r.name == "gridserve.replica"]
    assert events == ["engine_stalled", "engine_recovered"]
    stalled = next(r for r in caplog.records if r.getMessage().startswith("engine_stalled"))
    assert stalled.levelno == logging.WARNING and "waiting=1" in stalled.getMessage()


async def test_watchdog_never_undoes_a_drain(tiny_loaded, engine, watched):
    servicer, watch = watched
    engine.wedge()
    handle = engine.submit("r", tiny_loaded.encode_prompt(PROMPT), SamplingOptions(max_tokens=4))
    await wait_status(servicer, NOT_SERVING)
    await servicer.enter_graceful_shutdown()
    engine.wedge(False)
    assert await finish_of(handle) == "length"
    while watch.stalled:
        await asyncio.sleep(0.02)
    assert await status(servicer) == NOT_SERVING
