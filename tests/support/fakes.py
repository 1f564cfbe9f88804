"""Fakes for proxy tests: a head (routes, status) and replicas as real grpc.aio servers, and the proxy process."""
from __future__ import annotations

import asyncio
import itertools
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from gridserve.common import grpcutil
from gridserve.common.model_config import ModelConfig
from gridserve.common.model_config_proto import config_to_proto
from gridserve.common.errors import InvalidRequest, Overloaded, Unavailable
from gridserve.v1 import head_pb2, head_pb2_grpc, model_config_pb2, replica_pb2, replica_pb2_grpc

CHUNKS = ["Hello", ", ", "world", "!"]
# The answer to the prompt "script": (token ids, text) per chunk, as a greedy replica would always give it.
# One chunk holds its text back (a partial character) and the next brings it; one carries two tokens.
SCRIPT = [((101,), "The"), ((102,), " quick"), ((103,), ""), ((104,), " browné"), ((105, 106), " fox jumps"),
          ((107,), " over"), ((108,), " the"), ((109,), " lazy"), ((110,), " dog"), ((111,), ".")]
SCRIPT_TEXT = "".join(text for _, text in SCRIPT)
SCRIPT_IDS = [i for ids, _ in SCRIPT for i in ids]
ACCEPTED = (("x-gridserve-accepted", "1"),)


def model_config(name: str = "tiny") -> model_config_pb2.ModelConfig:
    return config_to_proto(ModelConfig.from_dict(name, {
        "source": {"type": "local", "path": "/x"}, "context_length": 128, "max_tokens_limit": 32,
        "sampling": {"max_new_tokens": 16}, "description": "fake"}))



_versions = itertools.count(1)


class FakeReplica(replica_pb2_grpc.ReplicaServicer):
    """A replica whose instance `mode` fails every call ("unavailable", "exhausted", "invalid") or never
    answers ("mute": no metadata, no chunk, like a stopped process), or else admits the call (initial
    metadata, as the real replica) and replies by the user text: "slow" (chunks 0.3 s apart), "hold" (one
    chunk, then waits), "slowstart" (waits before the first chunk), "queued" (CHUNKS 1.5 s after admission),
    "die" (two chunks, then the whole server stops), "long" (CHUNKS, finish LENGTH), "script" (SCRIPT from
    after the request's resume_token_ids; with `die_after` k: k chunks, then, once `gate` is set if given,
    the whole server stops, or the call fails with `die_with` if given; with `abort_after` k: k chunks, then
    (gate too) a FINISH_REASON_ABORT chunk as a draining replica sends it), anything else: CHUNKS at once,
    finish STOP. Info reports `running`, `waiting`, `seconds_since_step` and the prompt token counts as set on
    the instance."""

    def __init__(self, replica_id: str, mode: str = "ok", die_after: int | None = None,
                 abort_after: int | None = None, gate: asyncio.Event | None = None,
                 die_with: Exception | None = None):
        self.replica_id, self.mode = replica_id, mode
        self.die_after, self.abort_after, self.gate, self.die_with = die_after, abort_after, gate, die_with
        self.running, self.waiting, self.seconds_since_step = 0, 0, 0.0
        self.prompt_tokens_cached, self.prompt_tokens_prefilled = 0, 0
        self.requests: list[replica_pb2.GenerateRequest] = []
        self.cancelled: dict[str, asyncio.Event] = {}
        self.server = None
        self.address = ""

    async def start(self) -> "FakeReplica":
        self.server = grpcutil.make_server()
        replica_pb2_grpc.add_ReplicaServicer_to_server(self, self.server)
        self.address = f"127.0.0.1:{grpcutil.bind(self.server, '127.0.0.1', 0)}"
        await self.server.start()
        return self

    async def Generate(self, request, context):
        self.requests.append(request)
        self.cancelled[request.request_id] = cancelled = asyncio.Event()
        if self.mode == "unavailable":
            raise Unavailable("replica is shutting down")
        if self.mode == "exhausted":
            raise Overloaded("engine queue is full (64 waiting)")
        if self.mode == "invalid":
            raise InvalidRequest("prompt is 300 tokens but the context length is 128")
        text = request.prompt or request.chat.messages[-1].content
        try:
            if self.mode == "mute":
                await asyncio.sleep(3600)
            await context.send_initial_metadata(ACCEPTED)
            reply = self._script(list(request.resume_token_ids)) if text == "script" else self._reply(text)
            async for chunk in reply:
                yield chunk
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def _script(self, resume: list[int]):
        """SCRIPT after `resume`, which must end on a chunk boundary of it (else INVALID_ARGUMENT)."""
        starts = list(itertools.accumulate((len(ids) for ids, _ in SCRIPT), initial=0))
        if resume != SCRIPT_IDS[:len(resume)] or len(resume) not in starts:
            raise InvalidRequest(f"resume_token_ids {resume} are not a chunk-aligned prefix of the script")
        for sent, (ids, text) in enumerate(SCRIPT[starts.index(len(resume)):]):
            if sent in (self.die_after, self.abort_after):
                await asyncio.sleep(0.2)  # the proxy has read what was sent
                if self.gate is not None:
                    await self.gate.wait()
            if sent == self.die_after:
                if self.die_with is not None:
                    raise self.die_with
                asyncio.get_running_loop().create_task(self.server.stop(None))
                await asyncio.sleep(30)
            if sent == self.abort_after:
                yield replica_pb2.GenerateResponse(finish_reason=replica_pb2.FINISH_REASON_ABORT,
                                                   usage=replica_pb2.Usage(prompt_tokens=3, completion_tokens=1))
                return
            yield replica_pb2.GenerateResponse(text=text, token_ids=ids)
        yield replica_pb2.GenerateResponse(finish_reason=replica_pb2.FINISH_REASON_STOP,
                                           usage=replica_pb2.Usage(prompt_tokens=3, completion_tokens=len(SCRIPT_IDS)))

    async def _reply(self, text: str):
        if text == "slowstart":
            await asyncio.sleep(30)
        if text == "queued":
            await asyncio.sleep(1.5)
        if text == "hold":
            yield replica_pb2.GenerateResponse(text="first", token_ids=[1])
            await asyncio.sleep(30)
        if text == "die":
            yield replica_pb2.GenerateResponse(text="par", token_ids=[1])
            yield replica_pb2.GenerateResponse(text="tial", token_ids=[2])
            await asyncio.sleep(0.2)
            asyncio.get_running_loop().create_task(self.server.stop(None))
            await asyncio.sleep(30)
        for i, piece in enumerate(CHUNKS):
            if i and text == "slow":
                await asyncio.sleep(0.3)
            yield replica_pb2.GenerateResponse(text=piece, token_ids=[i])
        finish = replica_pb2.FINISH_REASON_LENGTH if text == "long" else replica_pb2.FINISH_REASON_STOP
        yield replica_pb2.GenerateResponse(finish_reason=finish,
                                           usage=replica_pb2.Usage(prompt_tokens=3, completion_tokens=4))

    async def Info(self, request, context):
        return replica_pb2.InfoResponse(replica_id=self.replica_id, model=self.replica_id.rsplit("-", 1)[0],
                                        loaded=True, running=self.running, waiting=self.waiting,
                                        seconds_since_step=self.seconds_since_step,
                                        prompt_tokens_cached_total=self.prompt_tokens_cached,
                                        prompt_tokens_prefilled_total=self.prompt_tokens_prefilled)


class FakeHead(head_pb2_grpc.RouteServiceServicer, head_pb2_grpc.AdminServiceServicer):
    """A head's RouteService (sends the current snapshot on Watch, after `first_delay_s`, then each
    published one) and its AdminService.Status (answers `status`)."""

    def __init__(self, first_delay_s: float = 0.0):
        self.first_delay_s = first_delay_s  # how long a Watch waits before its first snapshot
        self.current = head_pb2.RoutingTable(version=0)
        self.status = head_pb2.ClusterStatus()
        self.queues: list[asyncio.Queue] = []
        self.server = None
        self.port = 0

    async def start(self, port: int = 0) -> "FakeHead":
        self.server = grpcutil.make_server()
        head_pb2_grpc.add_RouteServiceServicer_to_server(self, self.server)
        head_pb2_grpc.add_AdminServiceServicer_to_server(self, self.server)
        self.port = grpcutil.bind(self.server, "127.0.0.1", port)
        await self.server.start()
        return self

    def publish(self, **models: list[FakeReplica | str]) -> int:
        """Publishes model -> endpoints (replicas, or bare addresses) as a new version; returns it."""
        table = head_pb2.RoutingTable(version=next(_versions))
        for name, endpoints in models.items():
            route = table.routes.add(model=name, model_config=model_config(name))
            for ep in endpoints:
                rid, addr = (ep.replica_id, ep.address) if isinstance(ep, FakeReplica) else (f"dead-{ep}", ep)
                route.endpoints.add(replica_id=rid, address=addr, node_id="n1")
        self.current = table
        for q in self.queues:
            q.put_nowait(table)
        return table.version

    async def Watch(self, request, context):
        q: asyncio.Queue = asyncio.Queue()
        self.queues.append(q)
        try:
            await asyncio.sleep(self.first_delay_s)
            yield self.current
            while True:
                yield await q.get()
        finally:
            self.queues.remove(q)

    async def Status(self, request, context):
        return self.status


class Proxy:
    """`python -m gridserve.proxy` as a child process, with its stderr in a log file."""

    def __init__(self, head_port: int, workdir: Path, extra: tuple[str, ...] = ()):
        self.head_port, self.workdir, self.extra = head_port, workdir, tuple(extra)
        self.log_path = workdir / "proxy.log"
        self.proc = None
        self.url = ""

    async def start(self) -> "Proxy":
        port_file = self.workdir / "proxy.port"
        self.log = open(self.log_path, "wb")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gridserve.proxy", "--head", f"127.0.0.1:{self.head_port}",
            "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file), "--max-body-bytes", "4096",
            *self.extra, stderr=self.log, stdin=asyncio.subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not port_file.exists():
            assert self.proc.returncode is None, self.log_path.read_text()
            assert time.monotonic() < deadline, "proxy did not write its port file"
            await asyncio.sleep(0.05)
        self.port = int(port_file.read_text())
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.log.close()
        return self.proc.returncode


async def wait_version(http: aiohttp.ClientSession, proxy: Proxy, version: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        async with http.get(f"{proxy.url}/health") as r:
            if (await r.json())["routes_version"] == version:
                return
        assert time.monotonic() < deadline, f"proxy never applied routes version {version}"
        await asyncio.sleep(0.05)


async def publish(http, proxy: Proxy, head: FakeHead, **models) -> None:
    await wait_version(http, proxy, head.publish(**models))




# Module-scoped fixtures a proxy test module imports: a fake head, the real proxy on it, an HTTP client.

@pytest.fixture(scope="module")
async def head():
    h = await FakeHead().start()
    yield h
    await h.server.stop(None)


@pytest.fixture(scope="module")
async def proxy(head, tmp_path_factory):
    p = await Proxy(head.port, tmp_path_factory.mktemp("proxy")).start()
    yield p
    await p.stop()


@pytest.fixture(scope="module")
async def http():
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def replicas():
    """Starts fake replicas on demand (`await replicas(id, mode, **options)`); stops them all after the test."""
    started: list[FakeReplica] = []

    async def make(replica_id: str, mode: str = "ok", **kwargs) -> FakeReplica:
        r = await FakeReplica(replica_id, mode, **kwargs).start()
        started.append(r)
        return r

    yield make
    await asyncio.gather(*(r.server.stop(None) for r in started))
