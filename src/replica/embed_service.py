"""The replica's Embed RPC: queue the inputs on the embedding engine, say it took them, answer the vectors."""
from __future__ import annotations

import asyncio
import logging
import secrets
import time

from gridserve.common.errors import GridserveError, InvalidRequest, Unavailable
from gridserve.common.eventlog import event
from gridserve.v1 import replica_pb2

log = logging.getLogger("gridserve.replica")
ACCEPTED = (("x-gridserve-accepted", "1"),)  # as Generate: sent once the engine has taken the request


def generate_refused(model) -> InvalidRequest:
    """What a Generate call to an embedding model gets."""
    return InvalidRequest(f"model '{model.name}' is an embedding model: it answers POST /v1/embeddings, "
                          f"not chat or completions")


async def embed(cfg, engine, request: replica_pb2.EmbedRequest, context):
    """Serve one Embed call on a replica (`engine` None while loading): the accept, then one response."""
    request_id = request.request_id or f"emb-{secrets.token_hex(6)}"
    if cfg.model.task != "embedding":
        raise InvalidRequest(f"model '{cfg.model.name}' generates text: it answers chat and completions, "
                             f"not POST /v1/embeddings")
    if engine is None:
        raise Unavailable(f"replica {cfg.replica_id} is still loading model '{cfg.model.name}'")
    start = time.monotonic()
    try:
        handle = engine.submit(request_id, list(request.inputs))  # tokenized in the engine's thread, batched
    except GridserveError as e:
        event(log, "embed_rejected", request_id=request_id, code=e.grpc_code.name, error=e.message)
        raise
    outcome, tokens, error = "error", 0, {}
    try:
        await context.send_initial_metadata(ACCEPTED)
        result = await handle.result()
        outcome, tokens = "ok", result.prompt_tokens
    except asyncio.CancelledError:
        outcome = "cancelled"
        raise
    except GridserveError as e:
        error = {"error": e.message}
        raise
    finally:
        handle.cancel()  # no-op once done; drops queued inputs of a caller that went away
        event(log, "embed_done", request_id=request_id, outcome=outcome, inputs=handle.inputs,
              prompt_tokens=tokens, seconds=f"{time.monotonic() - start:.3f}", **error)
    yield replica_pb2.EmbedResponse(
        embeddings=[replica_pb2.Embedding(values=v) for v in result.vectors.tolist()],
        prompt_tokens=result.prompt_tokens, dimensions=result.vectors.shape[1])
