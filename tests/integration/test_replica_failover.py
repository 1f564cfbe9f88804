"""Real replica processes: resuming a stream on another replica, the accept signal, and a wedged engine detected."""
from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest

from gridserve.common.grpcutil import NOT_SERVING, check_health
from gridserve.common.model_config import ModelConfig
from gridserve.common.model_config_proto import config_to_arg
from gridserve.v1 import replica_pb2
from test_replica_process import Replica, request
from support.waiting import wait_until

ACCEPTED = ("x-gridserve-accepted", "1")
MULTIBYTE_PROMPT = "word8 日本"  # the tiny model's greedy output holds a byte token back after token 18


def config(model_dir, **extra) -> str:
    return config_to_arg(ModelConfig.from_dict("tiny", {
        "source": {"type": "local", "path": str(model_dir)}, "context_length": 1024, "max_tokens_limit": 900,
        "sampling": {"temperature": 0, "max_new_tokens": 16}, "max_batch_size": 4, **extra}))


@pytest.fixture(scope="module")
async def pair(tiny_model_dir, tmp_path_factory):
    """Two replicas of the same model, started side by side."""
    tmp = tmp_path_factory.mktemp("failover")
    replicas = [Replica(tmp, config(tiny_model_dir), name=n) for n in ("a", "b")]
    try:
        for r in replicas:
            await r.wait_bound()
        for r in replicas:
            await r.wait_serving()
        yield replicas
    finally:
        for r in replicas:
            if r.channel is not None:
                await r.channel.close()
            r.stop()


def resume_request(prompt: str, resume: list[int], **params) -> replica_pb2.GenerateRequest:
    req = request(prompt, **params)
    req.resume_token_ids.extend(resume)
    return req


async def test_a_stream_resumed_on_another_replica_after_any_chunk_continues_it_exactly(pair):
    a, b = pair
    whole = [c async for c in a.stub.Generate(request(MULTIBYTE_PROMPT, max_tokens=32))]
    whole_text, whole_ids = "".join(c.text for c in whole), [t for c in whole for t in c.token_ids]
    assert len(whole_ids) == 32 and len(whole) > 1
    text, ids = "", []
    for chunk in whole[:-1]:  # the proxy fails over after any chunk it has passed on
        text, ids = text + chunk.text, ids + list(chunk.token_ids)
        rest = [c async for c in b.stub.Generate(resume_request(MULTIBYTE_PROMPT, ids, max_tokens=32,
                                                                request_id=f"resume-{len(ids)}"))]
        assert text + "".join(c.text for c in rest) == whole_text, f"split after {len(ids)} tokens"
        assert ids + [t for c in rest for t in c.token_ids] == whole_ids
        assert rest[-1].finish_reason == whole[-1].finish_reason == replica_pb2.FINISH_REASON_LENGTH
        assert rest[-1].usage.prompt_tokens == whole[-1].usage.prompt_tokens
        assert rest[-1].usage.completion_tokens == 32
    assert f"generate_start request_id=resume-{len(ids)} " in b.log()
    assert f"resume_tokens={len(ids)}" in b.log()


@pytest.mark.parametrize("resume,message", [
    ([1, 10**6], "resume_token_ids[1] = 1000000 is not a token id"),
    ([5] * 8, "resume_token_ids has 8 tokens and max_tokens is 8: nothing is left to generate"),
])
async def test_bad_resume_ids_are_invalid_argument(pair, resume, message):
    call = pair[1].stub.Generate(resume_request("Hello there", resume, max_tokens=8))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        [c async for c in call]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()
    assert ACCEPTED not in tuple(await call.initial_metadata())  # refused, never accepted


async def test_an_accepted_call_says_so_in_its_initial_metadata(pair):
    call = pair[0].stub.Generate(request(max_tokens=4))
    assert ACCEPTED in tuple(await call.initial_metadata())
    assert sum(len(c.token_ids) for c in [c async for c in call]) == 4


async def logged(r: Replica, text: str) -> bool:
    return text in r.log()


async def not_serving(r: Replica) -> bool:
    return await check_health(r.channel, "gridserve.v1.Replica") == NOT_SERVING


async def test_a_wedged_engine_turns_health_not_serving_while_grpc_still_answers(tiny_model_dir, tmp_path):
    r = Replica(tmp_path, config(tiny_model_dir, stall_timeout_s=1.5), name="wedge",
                env={"GRIDSERVE_FAULT_INJECTION": "1"})
    try:
        await r.wait_bound()
        await r.wait_serving()
        streaming = r.stub.Generate(request(max_tokens=900))
        await streaming.read()
        r.proc.send_signal(signal.SIGUSR1)
        wedged = time.monotonic()
        await wait_until(lambda: logged(r, "fault_injected"), 5, "fault_injected event")
        # A request that has to wait (the engine makes no steps) is still accepted at once.
        waiting = r.stub.Generate(request("Another prompt", max_tokens=4))
        first_token = asyncio.create_task(waiting.read())
        assert ACCEPTED in tuple(await asyncio.wait_for(waiting.initial_metadata(), 3))
        assert not first_token.done()
        await wait_until(lambda: not_serving(r), 8, "NOT_SERVING")
        assert time.monotonic() - wedged >= 1.5
        info = await r.stub.Info(replica_pb2.InfoRequest(), timeout=2)  # gRPC still answers
        assert info.seconds_since_step > 1.5 and info.waiting == 1 and info.loaded
        assert await check_health(r.channel, "") == NOT_SERVING
        assert "engine_stalled" in r.log() and "fault_injected" in r.log()
        assert not first_token.done()
        for call in (streaming, waiting):
            call.cancel()
        await asyncio.gather(first_token, return_exceptions=True)
    finally:
        await r.channel.close() if r.channel else None
        r.proc.kill()
        r.proc.wait()


async def test_without_fault_injection_sigusr1_keeps_its_default_action(tiny_model_dir, tmp_path):
    r = Replica(tmp_path, config(tiny_model_dir), name="plain")
    try:
        await r.wait_bound()
        await r.wait_serving()
        r.proc.send_signal(signal.SIGUSR1)
        assert r.proc.wait(10) == -signal.SIGUSR1
    finally:
        await r.channel.close() if r.channel else None
        r.stop()
