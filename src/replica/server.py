"""The replica process: binds gRPC first, loads the model off the loop, serves Generate, Info and health."""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import sys
import threading
import time

from gridserve.common.errors import GridserveError, InvalidRequest, Unavailable
from gridserve.common.files import write_port_file
from gridserve.common.grpcutil import NOT_SERVING, SERVING, add_health, add_reflection, bind, make_server
from gridserve.common.eventlog import event
from gridserve.common.service import Stop, run_service
from gridserve.replica.process_memory import release_free_memory
from gridserve.replica.settings import ReplicaConfig, parse_config
from gridserve.common.request_contract import FinishReason
from gridserve.replica.request_params import resolve_request
from gridserve.replica.embed_service import embed, generate_refused
from gridserve.replica.stall_watchdog import StallWatch
from gridserve.v1 import replica_pb2, replica_pb2_grpc

log = logging.getLogger("gridserve.replica")
SERVICE_NAME = replica_pb2.DESCRIPTOR.services_by_name["Replica"].full_name
# Initial metadata sent as soon as the engine has taken a request (queued or running), before its first
# token: a caller that gets no accept in a few seconds may try another replica.
ACCEPTED = (("x-gridserve-accepted", "1"),)
FAULT_ALLOC_MB = 256  # what one SIGUSR2 allocates under fault injection
MAX_THREADS = 4096


class ReplicaService(replica_pb2_grpc.ReplicaServicer):
    """Generate, Info and SetThreads; `engine` is set once the model has loaded (Unavailable before that)."""

    def __init__(self, cfg: ReplicaConfig):
        self.cfg = cfg
        self.engine = None  # gridserve.replica.engine.Engine, once loaded

    async def Generate(self, request, context):
        request_id = request.request_id or f"req-{secrets.token_hex(6)}"
        try:
            prompt_ids, opts, handle = await self._admit(request, request_id)
        except GridserveError as e:
            event(log, "generate_rejected", request_id=request_id, code=e.grpc_code.name, error=e.message)
            raise
        resumed = {"resume_tokens": handle.resume_tokens} if handle.resume_tokens else {}
        event(log, "generate_start", request_id=request_id, prompt_tokens=len(prompt_ids),
              max_tokens=opts.max_tokens, temperature=opts.temperature, stop=len(opts.stop), **resumed)
        start, finish, completion, error = time.monotonic(), "error", 0, ""
        try:
            await context.send_initial_metadata(ACCEPTED)
            async for out in handle.outputs():
                completion = out.completion_tokens or completion
                chunk = replica_pb2.GenerateResponse(text=out.text, token_ids=out.token_ids)
                if out.finish_reason:
                    finish = FinishReason(out.finish_reason)
                    chunk.finish_reason = finish.to_proto()
                    chunk.usage.prompt_tokens = len(prompt_ids)
                    chunk.usage.completion_tokens = out.completion_tokens
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):  # the client went away: grpc cancels the task, or
            finish = "cancelled"                         # closes this generator at its yield
            raise
        except GridserveError as e:
            error = e.message
            raise
        finally:
            handle.cancel()  # no-op when finished; frees the engine slot when the client went away
            fields = {"error": error} if error else {}
            if handle.cached_tokens:
                fields["cached_tokens"] = handle.cached_tokens
            event(log, "generate_done", request_id=request_id, finish=finish, prompt_tokens=len(prompt_ids),
                  completion_tokens=completion, seconds=f"{time.monotonic() - start:.3f}", **fields)

    async def _admit(self, request, request_id: str):
        """Validate, tokenize (off the loop) and queue a request: (prompt ids, options, engine handle)."""
        engine = self.engine
        if self.cfg.model.task != "generate":
            raise generate_refused(self.cfg.model)
        if engine is None:
            raise Unavailable(f"replica {self.cfg.replica_id} is still loading model '{self.cfg.model.name}'")
        kind, value, opts = resolve_request(request, self.cfg.model)
        encode = engine.loaded.encode_prompt if kind == "prompt" else engine.loaded.encode_chat
        prompt_ids = await asyncio.to_thread(encode, value)
        ctx = self.cfg.model.context_length
        if len(prompt_ids) >= ctx:
            raise InvalidRequest(f"the prompt is {len(prompt_ids)} tokens; model '{self.cfg.model.name}' has a "
                                 f"context length of {ctx} tokens, so the prompt must be shorter than that")
        return prompt_ids, opts, engine.submit(request_id, prompt_ids, opts, list(request.resume_token_ids))

    async def Embed(self, request, context):
        async for reply in embed(self.cfg, self.engine, request, context):
            yield reply

    async def SetThreads(self, request, context):
        """The node's scheduler gives this replica a new torch thread count (its share of the node changed)."""
        if not 1 <= request.num_threads <= MAX_THREADS:
            raise InvalidRequest(f"num_threads must be 1 to {MAX_THREADS}, got {request.num_threads}")
        if self.engine is None:
            raise Unavailable(f"replica {self.cfg.replica_id} is still loading model '{self.cfg.model.name}'")
        self.engine.set_threads(request.num_threads)
        event(log, "threads_set", num_threads=request.num_threads)
        return replica_pb2.SetThreadsResponse(num_threads=request.num_threads)

    async def Info(self, request, context):
        cfg, engine = self.cfg, self.engine
        info = replica_pb2.InfoResponse(
            replica_id=cfg.replica_id, model=cfg.model.name, model_source=cfg.model.source.describe(),
            context_length=cfg.model.context_length, max_tokens_limit=cfg.model.max_tokens_limit,
            loaded=engine is not None, pid=os.getpid(), num_threads=cfg.num_threads)
        if engine is not None:
            s = engine.stats()
            info.running, info.waiting = s.running, s.waiting
            info.requests_total, info.tokens_generated_total = s.requests_total, s.tokens_generated_total
            info.tokens_per_second, info.rss_bytes = s.tokens_per_second, s.rss_bytes
            info.max_batch_size, info.max_waiting = s.max_batch_size, s.max_waiting
            info.steps_total, info.mean_batch_size = s.steps_total, s.mean_batch_size
            info.num_threads = s.num_threads or cfg.num_threads
            info.seconds_since_step = s.seconds_since_step
            info.prompt_tokens_cached_total = s.prompt_tokens_cached_total
            info.prompt_tokens_prefilled_total = s.prompt_tokens_prefilled_total
        else:
            import psutil
            info.rss_bytes = psutil.Process().memory_info().rss
        return info


def _build_engine(cfg: ReplicaConfig):
    """Runs in the load thread: import torch, load the model, build (not start) the engine."""
    from gridserve.replica.engine import Engine
    if cfg.model.source.type == "fake":  # no weights, no torch: see gridserve.replica.fake_model
        from gridserve.replica.fake_model import load_fake
        return Engine(load_fake(cfg.model), cfg.num_threads)
    import torch
    torch.set_num_threads(cfg.num_threads)
    if cfg.model.task == "embedding":
        from gridserve.replica.embedding_engine import build_embedding_engine
        engine = build_embedding_engine(cfg)
    else:
        from gridserve.replica.model_loader import load_model
        engine = Engine(load_model(cfg.model, cfg.cache_dir), cfg.num_threads)
    release_free_memory()  # the load's parsing buffers, freed but still resident
    return engine


def _in_daemon_thread(fn, *args) -> tuple[asyncio.Future, threading.Thread]:
    """Run fn in a daemon thread (a shutdown need not wait for a load); its result as a loop future."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def settle(ok: bool, value) -> None:
        if not fut.done():
            fut.set_result(value) if ok else fut.set_exception(value)

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the loop, which decides
            loop.call_soon_threadsafe(settle, False, e)
        else:
            loop.call_soon_threadsafe(settle, True, result)

    thread = threading.Thread(target=run, name="load", daemon=True)
    thread.start()
    return fut, thread


class ReplicaProcess:
    """The lifecycle: bind, NOT_SERVING, load, SERVING, wait for a signal, drain, stop."""

    def __init__(self, cfg: ReplicaConfig):
        self.cfg = cfg
        self.service = ReplicaService(cfg)
        self.load_thread: threading.Thread | None = None
        self.leak: list[bytes] = []  # what SIGUSR2 fault injection holds

    async def _set_health(self, health, status) -> None:
        for name in ("", SERVICE_NAME):
            await health.set(name, status)

    async def run(self, stop: Stop) -> int:
        cfg = self.cfg
        server = make_server(cfg.security)
        replica_pb2_grpc.add_ReplicaServicer_to_server(self.service, server)
        health = add_health(server)
        add_reflection(server, SERVICE_NAME)
        await self._set_health(health, NOT_SERVING)
        port = bind(server, cfg.host, cfg.port, cfg.security)
        await server.start()
        if cfg.port_file:
            write_port_file(cfg.port_file, port)
        event(log, "listening", replica_id=cfg.replica_id, address=f"{cfg.host}:{port}", model=cfg.model.name,
              source=cfg.model.source.describe(), pid=os.getpid())
        if cfg.fault_injection:
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self._inject_fault)
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, self._inject_allocation)
        try:
            if await self._load(health, stop):
                await self._serve(health, stop)
        finally:
            await self._shutdown(server, health)
        return 0

    async def _serve(self, health, stop: asyncio.Event) -> None:
        """Serve until told to stop, with the engine stall watchdog running."""
        watch = StallWatch(self.service.engine, self.cfg.model.stall_timeout_s,
                           lambda status: self._set_health(health, status))
        task = asyncio.create_task(watch.run(), name="stall-watch")
        try:
            await stop.wait()
        finally:
            task.cancel()
            await asyncio.wait([task])

    def _engine_died(self, health, reason: str) -> None:
        """The engine thread died (its requests have failed already): NOT_SERVING now, so the scheduler
        replaces this replica without waiting for the stall watchdog."""
        event(log, "not_serving", logging.ERROR, reason=f"engine thread died: {reason}")
        asyncio.ensure_future(self._set_health(health, NOT_SERVING))

    def _inject_fault(self) -> None:
        """SIGUSR1 under GRIDSERVE_FAULT_INJECTION=1: wedge the engine thread (it makes no more steps)."""
        engine = self.service.engine
        event(log, "fault_injected", logging.WARNING, fault="engine_wedged", loaded=engine is not None)
        if engine is not None:
            engine.wedge()

    def _inject_allocation(self) -> None:
        """SIGUSR2 under GRIDSERVE_FAULT_INJECTION=1: hold FAULT_ALLOC_MB more resident memory (a leak)."""
        self.leak.append(b"\x01" * (FAULT_ALLOC_MB << 20))  # written bytes: resident, unlike a zeroed buffer
        event(log, "fault_injected", logging.WARNING, fault="memory_allocated", held_mb=len(self.leak) * FAULT_ALLOC_MB)

    async def _load(self, health, stop: asyncio.Event) -> bool:
        """Load off the loop; True once SERVING, False if told to stop first. Fatal errors propagate."""
        started = time.monotonic()
        event(log, "loading", model=self.cfg.model.name, cache_dir=self.cfg.cache_dir)
        fut, self.load_thread = _in_daemon_thread(_build_engine, self.cfg)
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([fut, stopper], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if not fut.done():
            event(log, "stopped_while_loading", model=self.cfg.model.name)
            return False
        engine = fut.result()
        loop = asyncio.get_running_loop()
        engine.on_dead = lambda reason: loop.call_soon_threadsafe(self._engine_died, health, reason)
        engine.start()
        self.service.engine = engine
        await self._set_health(health, SERVING)
        lm = engine.loaded
        event(log, "model_loaded", model=self.cfg.model.name, source=lm.source, device=lm.device,
              weights=getattr(lm, "weights", "") or "-", from_cache=lm.from_cache, load_seconds=f"{lm.load_seconds:.2f}",
              seconds=f"{time.monotonic() - started:.2f}", rss_mb=engine.stats().rss_bytes // 2**20)
        return True

    async def _shutdown(self, server, health) -> None:
        event(log, "stopping", replica_id=self.cfg.replica_id, grace_s=self.cfg.shutdown_grace_s)
        await health.enter_graceful_shutdown()  # NOT_SERVING for every service, from now on
        await server.stop(self.cfg.shutdown_grace_s)  # in-flight streams may finish; then cancelled
        if self.service.engine is not None:
            await asyncio.to_thread(self.service.engine.stop)
        event(log, "stopped", replica_id=self.cfg.replica_id)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m gridserve.replica`: 0 on a clean stop, 3 (ExitCode.FATAL) on a fatal
    config or load error, which tells the scheduler not to restart it."""
    started: list[ReplicaProcess] = []

    def serve(cfg: ReplicaConfig, stop: Stop):
        started.append(ReplicaProcess(cfg))
        return started[0].run(stop)

    code = run_service("replica", parse_config, serve, argv)
    if started and started[0].load_thread is not None and started[0].load_thread.is_alive():
        # Stopped mid-load: a torch import or load still running in a daemon thread can crash
        # interpreter teardown, so leave without it.
        sys.stderr.flush()
        os._exit(code)
    return code
