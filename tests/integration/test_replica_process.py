"""A real `python -m gridserve.replica` process with the tiny model: health, streaming, errors, cancel, stop."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from gridserve.common.model_config import ModelConfig
from gridserve.common.model_config_proto import config_to_arg
from gridserve.common.grpcutil import NOT_SERVING, SERVING, channel, check_health
from gridserve.v1 import replica_pb2, replica_pb2_grpc
from support.reflect import list_services

CONTEXT = 256
LIMIT = 64


def tiny_config(path) -> str:
    return config_to_arg(ModelConfig.from_dict("tiny", {
        "source": {"type": "local", "path": str(path)}, "context_length": CONTEXT, "max_tokens_limit": LIMIT,
        "sampling": {"temperature": 0, "max_new_tokens": 16}, "max_batch_size": 4}))


class Replica:
    """One spawned replica process, its stderr log and a channel to it."""

    def __init__(self, tmp, model_config: str, name: str = "r", env: dict[str, str] | None = None):
        self.port_file = tmp / f"{name}.port"
        self.log_path = tmp / f"{name}.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gridserve.replica", "--replica-id", f"tiny-{name}00000",
             "--model-config", model_config, "--host", "127.0.0.1", "--port", "0",
             "--port-file", str(self.port_file), "--num-threads", "1", "--cache-dir", str(tmp / "cache")],
            stdout=subprocess.DEVNULL, stderr=open(self.log_path, "w"), env=env)
        self.address = None
        self.channel = None

    def log(self) -> str:
        return self.log_path.read_text()

    async def wait_bound(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.port_file.exists():
            assert self.proc.poll() is None, f"replica exited early:\n{self.log()}"
            assert time.monotonic() < deadline, f"no port file after {timeout}s:\n{self.log()}"
            await asyncio.sleep(0.02)
        self.address = f"127.0.0.1:{int(self.port_file.read_text())}"
        self.channel = channel(self.address)
        self.stub = replica_pb2_grpc.ReplicaStub(self.channel)

    async def wait_serving(self, timeout: float = 60) -> list[int]:
        """Poll health until SERVING; returns every status seen on the way."""
        seen, deadline = [], time.monotonic() + timeout
        while not seen or seen[-1] != SERVING:
            assert self.proc.poll() is None, f"replica exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"not SERVING after {timeout}s:\n{self.log()}"
            try:
                seen.append(await check_health(self.channel, "gridserve.v1.Replica"))
            except grpc.aio.AioRpcError as e:  # a replica busy loading torch may miss one probe's deadline
                if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
            await asyncio.sleep(0.05)
        return seen

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
async def replica(tiny_model_dir, tmp_path_factory):
    r = Replica(tmp_path_factory.mktemp("replica"), tiny_config(tiny_model_dir))
    try:
        await r.wait_bound()
        r.startup_health = await r.wait_serving()
        yield r
    finally:
        if r.channel is not None:
            await r.channel.close()
        r.stop()


def request(prompt: str = "Hello there", request_id: str = "", **params) -> replica_pb2.GenerateRequest:
    params = {"temperature": 0.0, "max_tokens": 16, **params}
    return replica_pb2.GenerateRequest(request_id=request_id, prompt=prompt,
                                       params=replica_pb2.SamplingParams(**params))


async def generate(stub, req) -> tuple[str, list[int], list[replica_pb2.GenerateResponse]]:
    chunks = [c async for c in stub.Generate(req)]
    return "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids], chunks


async def test_health_is_not_serving_while_loading_then_serving(replica):
    assert replica.startup_health[0] == NOT_SERVING
    assert replica.startup_health[-1] == SERVING
    assert await check_health(replica.channel, "") == SERVING
    info = await replica.stub.Info(replica_pb2.InfoRequest())
    assert info.loaded and info.model == "tiny" and info.context_length == CONTEXT
    assert info.pid == replica.proc.pid and info.rss_bytes > 0


async def test_generate_streams_chunks_and_ends_with_finish_and_usage(replica):
    text, ids, chunks = await generate(replica.stub, request(request_id="stream-test-1", max_tokens=12))
    assert len(chunks) > 3
    assert len(ids) == 12 and text
    last = chunks[-1]
    assert last.finish_reason == replica_pb2.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == 12 and last.usage.prompt_tokens > 0
    assert all(c.finish_reason == replica_pb2.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    log = replica.log()
    assert "generate_start request_id=stream-test-1" in log
    assert "generate_done request_id=stream-test-1 finish=length" in log


def chat(*messages) -> replica_pb2.GenerateRequest:
    return replica_pb2.GenerateRequest(chat=replica_pb2.ChatMessages(
        messages=[replica_pb2.ChatMessage(role=r, content=c) for r, c in messages]))


BAD_REQUESTS = [  # each message names the field, as the proxy's 400 for the same input would
    (request(prompt=""), "'prompt' must be a non-empty string"),
    (replica_pb2.GenerateRequest(), "the request has no input"),
    (chat(), "'messages' must be a non-empty list"),
    (chat(("user", "hi"), ("wizard", "hi")), 'messages[1].role must be one of system, user, assistant, got "wizard"'),
    (request(max_tokens=0), f"'max_tokens' must be an integer in [1, {LIMIT}]"),
    (request(max_tokens=LIMIT + 1), f"got {LIMIT + 1}"),
    (request(temperature=3.0), "'temperature' must be a number in [0, 2]"),
    (request(top_p=0.0), "'top_p' must be a number in (0, 1]"),
    (request(top_p=1e-300), "'top_p' must be a number in (0, 1]"),
    (request(top_k=2**31), "'top_k' must be an integer in [0, 2147483647]"),
    (request(stop=[""]), "'stop' must be"),
    (request(stop=list("abcde")), "up to 4 non-empty strings"),
    (request(prompt="word " * (CONTEXT + 10)), f"context length of {CONTEXT}"),
]


@pytest.mark.parametrize("req,message", BAD_REQUESTS, ids=[m for _, m in BAD_REQUESTS])
async def test_bad_input_is_invalid_argument_and_the_replica_keeps_serving(replica, req, message):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(replica.stub, req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    _, ids, _ = await generate(replica.stub, request(max_tokens=2))
    assert len(ids) == 2


async def test_two_concurrent_streams_each_equal_their_solo_output(replica):
    reqs = [request("The capital of France is", max_tokens=24), request("1, 2, 3, 4,", max_tokens=24)]
    solo = [await generate(replica.stub, r) for r in reqs]
    together = await asyncio.gather(*(generate(replica.stub, r) for r in reqs))
    assert [t[:2] for t in together] == [s[:2] for s in solo]
    assert solo[0][1] != solo[1][1]


async def test_info_reports_batch_size_queue_depth_and_tokens_per_second(replica):
    calls = [asyncio.create_task(generate(replica.stub, request(f"Prompt number {i}", max_tokens=LIMIT)))
             for i in range(6)]  # max_batch_size is 4: two of them wait for a row
    seen_running, seen_waiting = 0, 0
    while not all(c.done() for c in calls):
        info = await replica.stub.Info(replica_pb2.InfoRequest())
        seen_running, seen_waiting = max(seen_running, info.running), max(seen_waiting, info.waiting)
        await asyncio.sleep(0.005)
    assert [len(c.result()[1]) for c in calls] == [LIMIT] * 6
    assert seen_running == 4 and seen_waiting >= 2  # never more rows than max_batch_size
    info = await replica.stub.Info(replica_pb2.InfoRequest())
    assert (info.max_batch_size, info.max_waiting, info.num_threads) == (4, 32, 1)
    assert info.tokens_per_second > 0 and info.mean_batch_size > 1
    assert info.steps_total < info.tokens_generated_total  # several rows per forward pass


async def test_the_replica_lists_its_services_by_reflection(replica):
    services, methods = await asyncio.to_thread(list_services, replica.address, None, "gridserve.v1.Replica")
    assert services == ["gridserve.v1.Replica", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"]
    assert methods == ["Generate", "Info", "SetThreads", "Embed"]


async def test_cancelled_stream_frees_the_replica_and_the_next_call_succeeds(replica):
    call = replica.stub.Generate(request(max_tokens=LIMIT, request_id="cancel-me"))
    got = 0
    async for _ in call:
        got += 1
        if got == 2:
            call.cancel()
            break
    deadline = time.monotonic() + 5
    while (info := await replica.stub.Info(replica_pb2.InfoRequest())).running:
        assert time.monotonic() < deadline, "the cancelled request still runs"
        await asyncio.sleep(0.05)
    assert info.waiting == 0
    _, ids, chunks = await generate(replica.stub, request(max_tokens=3))
    assert len(ids) == 3 and chunks[-1].finish_reason == replica_pb2.FINISH_REASON_LENGTH
    assert "generate_done request_id=cancel-me finish=cancelled" in replica.log()


async def test_sigterm_lets_the_open_stream_finish_and_exits_zero(tiny_model_dir, tmp_path):
    r = Replica(tmp_path, tiny_config(tiny_model_dir), name="term")
    try:
        await r.wait_bound()
        await r.wait_serving()
        call = r.stub.Generate(request(max_tokens=48))
        chunks = [await call.read()]
        r.proc.send_signal(signal.SIGTERM)
        while (chunk := await call.read()) is not grpc.aio.EOF:
            chunks.append(chunk)
        assert chunks[-1].finish_reason == replica_pb2.FINISH_REASON_LENGTH
        assert sum(len(c.token_ids) for c in chunks) == 48
        assert r.proc.wait(20) == 0
    finally:
        await r.channel.close() if r.channel else None
        r.stop()


async def test_hub_model_offline_is_fatal_with_exit_code_3(tmp_path):
    cfg = config_to_arg(ModelConfig.from_dict("gpt2", {"source": {"type": "hub", "repo": "openai-community/gpt2"},
                                                       "context_length": 1024, "max_tokens_limit": 512}))
    r = Replica(tmp_path, cfg, name="hub")
    try:
        assert r.proc.wait(60) == 3
    finally:
        r.stop()
    fatal = [line for line in r.log().splitlines() if line.startswith("fatal:")]
    assert len(fatal) == 1, r.log()
    assert "cannot load 'openai-community/gpt2' from the Hugging Face hub" in fatal[0]
    assert "HF_HUB_OFFLINE" in fatal[0]
