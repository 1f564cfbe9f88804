"""A real replica process serving the fake model: it streams paced words, cancels, resumes byte-exact, answers 429."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from gridserve.common.model_config import ModelConfig
from gridserve.common.model_config_proto import config_to_arg
from gridserve.v1 import replica_pb2
from test_replica_process import Replica

TPS = 50


def fake_config(max_batch_size: int = 2, max_waiting: int = 1) -> str:
    return config_to_arg(ModelConfig.from_dict("fake", {
        "source": {"type": "fake", "tokens_per_second": TPS}, "context_length": 512, "max_tokens_limit": 256,
        "sampling": {"temperature": 0, "max_new_tokens": 16}, "resources": {"num_cpus": 0.1},
        "max_batch_size": max_batch_size, "max_waiting": max_waiting}))


@pytest.fixture(scope="module")
async def fake(tmp_path_factory):
    r = Replica(tmp_path_factory.mktemp("fake"), fake_config(), name="f")
    try:
        await r.wait_bound()
        await r.wait_serving(timeout=20)
        yield r
    finally:
        r.stop()


def request(prompt: str, max_tokens: int, resume: list[int] = (), request_id: str = "") -> replica_pb2.GenerateRequest:
    return replica_pb2.GenerateRequest(request_id=request_id, prompt=prompt, resume_token_ids=list(resume),
                                       params=replica_pb2.SamplingParams(max_tokens=max_tokens))


async def stream(stub, req) -> tuple[str, list[int], int, list[float]]:
    text, ids, finish, times = "", [], 0, []
    async for chunk in stub.Generate(req, timeout=20):
        text += chunk.text
        ids.extend(chunk.token_ids)
        finish = chunk.finish_reason or finish
        times.append(time.monotonic())
    return text, ids, finish, times


async def test_fake_model_streams_words_at_its_pace_and_loads_no_torch(fake):
    text, ids, finish, times = await stream(fake.stub, request("tell me about the sea", 20))
    assert finish == replica_pb2.FINISH_REASON_LENGTH and len(ids) == 20
    assert len(text.split()) == 20 and text.startswith(" ")
    assert (times[-1] - times[0]) >= 19 / TPS * 0.9  # paced at tokens_per_second, not as fast as it can
    again = await stream(fake.stub, request("tell me about the sea", 20))
    assert again[:2] == (text, ids)  # deterministic
    info = await fake.stub.Info(replica_pb2.InfoRequest(), timeout=5)
    assert info.model_source.startswith("fake") and info.tokens_generated_total >= 40
    assert info.rss_bytes < 200 * 2**20  # no torch, no transformers in the process
    assert "model_loaded" in fake.log()


async def test_resumed_fake_stream_continues_byte_for_byte(fake):
    text, ids, _, _ = await stream(fake.stub, request("once upon a time", 12))
    first_text, first_ids, _, _ = await stream(fake.stub, request("once upon a time", 12))
    rest_text, rest_ids, finish, _ = await stream(fake.stub, request("once upon a time", 12, resume=ids[:5]))
    assert first_ids == ids and ids[5:] == rest_ids
    assert finish == replica_pb2.FINISH_REASON_LENGTH
    head = "".join(f" {w}" for w in text.split()[:5])
    assert head + rest_text == text


async def test_fake_replica_answers_429_when_full_and_a_cancel_frees_a_row(fake):
    long = [asyncio.create_task(stream(fake.stub, request("a long one", 200, request_id=f"long{i}")))
            for i in range(3)]  # 2 running + 1 waiting fill it
    for _ in range(200):
        info = await fake.stub.Info(replica_pb2.InfoRequest(), timeout=5)
        if (info.running, info.waiting) == (2, 1):
            break
        await asyncio.sleep(0.02)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stream(fake.stub, request("one too many", 4))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_batch_size=2" in err.value.details()
    long[0].cancel()  # the client goes away: its row is free at the next step, the waiting one takes it
    cancelled_at = time.monotonic()
    while (info.running, info.waiting) != (2, 0):
        assert time.monotonic() - cancelled_at < 2, (info.running, info.waiting)
        info = await fake.stub.Info(replica_pb2.InfoRequest(), timeout=5)
    late = asyncio.create_task(stream(fake.stub, request("now there is room", 4)))
    for task in long[1:]:
        task.cancel()
    assert len((await late)[1]) == 4
    await asyncio.gather(*long, return_exceptions=True)
    for _ in range(100):
        info = await fake.stub.Info(replica_pb2.InfoRequest(), timeout=5)
        if info.running + info.waiting == 0:
            break
        await asyncio.sleep(0.02)
    assert info.running + info.waiting == 0
