"""POST /v1/embeddings: parse, call Embed on a replica of the model (another one on UNAVAILABLE, RESOURCE_EXHAUSTED or a lost replica),
answer in OpenAI's list shape with float or base64 vectors, then log and count."""
from __future__ import annotations

import array
import asyncio
import base64
import logging
import sys

import grpc
from aiohttp import web

from gridserve.common.eventlog import event
from gridserve.proxy.embedding_requests import EmbeddingsJob, parse_embeddings
from gridserve.proxy.http_errors import HttpError, error_response
from gridserve.proxy.request_body import request_id_from
from gridserve.proxy.openai_wire import error_body
from gridserve.proxy.relay import STATE, RequestRecord, Wire, demand, parse_request
from gridserve.proxy.retry import RetryPolicy, accepted, attempt_error, on_some_replica
from gridserve.proxy.route_cache import Endpoint, RouteCache
from gridserve.v1 import replica_pb2, replica_pb2_grpc

log = logging.getLogger("gridserve.proxy")
API = "embeddings"
# The relay's parse step (routing-table wait, body size, metrics label) with this endpoint's parser.
WIRE = Wire(api=API, parse=parse_embeddings, answer=None, error_body=error_body, task="embedding")


async def embeddings(request: web.Request) -> web.Response:
    """POST /v1/embeddings in OpenAI's shape; errors as {"error": {"message", "type", "param", "code"}}."""
    state = request.app[STATE]
    rec = RequestRecord(request_id_from(request.headers.get("X-Request-Id")), API, state.metrics)
    event(log, "request_start", request_id=rec.request_id, api=API, model="")
    headers = {"X-Request-Id": rec.request_id}
    try:
        job: EmbeddingsJob = await parse_request(request, WIRE, state, rec)
        async with demand(state, job.model):  # counted for the autoscaler; held while the model is at zero
            reply, endpoint = await call_embed(state.table, job.model, job.embed, state.policy,
                                               on_retry=state.metrics.retries.labels(job.model).inc)
        rec.replica = endpoint.replica_id
        rec.result.prompt_tokens = reply.prompt_tokens
        state.metrics.prompt_tokens.labels(job.model).inc(reply.prompt_tokens)
        rec.status, rec.outcome = 200, "ok"
        return web.json_response(answer(job, reply), headers={**headers, "X-Replica-Id": endpoint.replica_id})
    except HttpError as e:
        rec.status, rec.error = e.status, e.message
        return error_response(e, error_body, headers=headers)
    except asyncio.CancelledError:  # the client went away: the replica call is cancelled with us
        rec.outcome, rec.status = "cancelled", rec.status or 499
        raise
    finally:
        rec.done()


def answer(job: EmbeddingsJob, reply: replica_pb2.EmbedResponse) -> dict:
    """OpenAI's embeddings list: one {"object": "embedding", "index", "embedding"} per input, then usage."""
    encode = base64_floats if job.encoding_format == "base64" else list
    data = [{"object": "embedding", "index": i, "embedding": encode(e.values)}
            for i, e in enumerate(reply.embeddings)]
    return {"object": "list", "data": data, "model": job.model,
            "usage": {"prompt_tokens": reply.prompt_tokens, "total_tokens": reply.prompt_tokens}}


def base64_floats(values) -> str:
    """Little-endian float32s, base64: what OpenAI sends for encoding_format "base64"."""
    packed = array.array("f", values)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


async def call_embed(table: RouteCache, model: str, request: replica_pb2.EmbedRequest, policy: RetryPolicy,
                     on_retry=lambda: None) -> tuple[replica_pb2.EmbedResponse, Endpoint]:
    """Embed on a replica picked by power of two choices; on UNAVAILABLE, RESOURCE_EXHAUSTED, a lost replica
    (`attempt_error`) or no admission within policy.accept_timeout_s, backs off and tries another (embedding is idempotent, so a replica that
    goes away mid-call is retried too). Raises HttpError: no replica, all failed, or a bad request."""
    async def attempt(endpoint: Endpoint):
        return await _embed_on(table, endpoint, request, policy.accept_timeout_s), endpoint
    return await on_some_replica(table, model, request.request_id, policy, attempt, on_retry)


async def _embed_on(table: RouteCache, endpoint: Endpoint, request: replica_pb2.EmbedRequest,
                    accept_timeout_s: float) -> replica_pb2.EmbedResponse:
    lease = table.acquire(endpoint)
    call = replica_pb2_grpc.ReplicaStub(lease.channel).Embed(request)
    try:
        await accepted(call, endpoint, accept_timeout_s)
        reply = await call.read()  # no time limit once admitted: the inputs may wait in the replica's queue
        if reply is not grpc.aio.EOF:
            await call.read()  # the end of the stream (and its status) follows at once
    except grpc.aio.AioRpcError as e:
        raise attempt_error(e, endpoint) from None
    finally:
        call.cancel()  # no-op once done; otherwise the replica drops the request
        lease.release()
    if reply is grpc.aio.EOF:
        raise HttpError(502, "upstream_error", f"replica {endpoint.replica_id} ended the call without vectors")
    return reply

