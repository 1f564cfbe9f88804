"""Embeddings request parsing and answer encoding: what is accepted, the 400 for each bad field, base64, task checks."""
from __future__ import annotations

import base64
import json
import struct

import pytest

from gridserve.common.errors import InvalidRequest, NotFound
from gridserve.common.model_config import ModelConfig
from gridserve.proxy.embedding_requests import parse_embeddings
from gridserve.proxy.embeddings import answer, base64_floats
from gridserve.proxy.http_errors import HttpError
from gridserve.proxy.model_tasks import check_task
from gridserve.v1 import replica_pb2

EMBED = ModelConfig.from_dict("minilm", {"task": "embedding", "source": {"type": "local", "path": "/m"},
                                         "context_length": 256})
CHAT = ModelConfig.from_dict("chat", {"source": {"type": "local", "path": "/c"}, "context_length": 256,
                                      "max_tokens_limit": 64, "sampling": {"max_new_tokens": 16}})
MODELS = {"minilm": EMBED, "chat": CHAT}


def parse(body: dict):
    return parse_embeddings(json.dumps(body).encode(), "application/json", "", MODELS, "rid")


def test_a_string_or_a_list_of_strings_becomes_the_inputs():
    job = parse({"model": "minilm", "input": "hello"})
    assert (job.model, list(job.embed.inputs), job.embed.request_id, job.encoding_format) == \
        ("minilm", ["hello"], "rid", "float")
    job = parse({"model": "minilm", "input": ["a", "b"], "encoding_format": "base64", "user": "u",
                 "dimensions": None})
    assert list(job.embed.inputs) == ["a", "b"] and job.encoding_format == "base64"


@pytest.mark.parametrize("body, param, words", [
    ({"model": "minilm", "input": "x", "dimensions": 64}, "dimensions", "not supported"),
    ({"model": "minilm", "input": [1, 2, 3]}, "input", "token-id inputs are not supported"),
    ({"model": "minilm", "input": [[1, 2], [3]]}, "input", "token-id inputs are not supported"),
    ({"model": "minilm", "input": []}, "input", "empty list"),
    ({"model": "minilm", "input": ["ok", ""]}, "input", "input[1] is an empty string"),
    ({"model": "minilm", "input": ["ok", {"t": 1}]}, "input", "input[1] must be a string"),
    ({"model": "minilm", "input": ["x"] * 2049}, "input", "at most 2048"),
    ({"model": "minilm", "input": 5}, "input", "a string or a list of strings"),
    ({"model": "minilm"}, "input", "'input' is required"),
    ({"input": "x"}, "model", "'model' is required"),
    ({"model": "minilm", "input": "x", "encoding_format": "int8"}, "encoding_format", "float"),
    ({"model": "minilm", "input": "x", "temperature": 0}, "temperature", "unrecognized"),
])
def test_bad_fields_are_400_naming_the_field(body, param, words):
    with pytest.raises(InvalidRequest) as caught:
        parse(body)
    assert caught.value.param == param and words in caught.value.message


def test_an_unknown_model_is_404_and_a_non_object_body_400():
    with pytest.raises(NotFound, match="not deployed"):
        parse({"model": "nope", "input": "x"})
    with pytest.raises(InvalidRequest, match="JSON object"):
        parse_embeddings(b"[1]", "application/json", "", MODELS, "rid")


def test_each_endpoint_takes_only_its_task():
    check_task(EMBED, "embedding")
    check_task(CHAT, "generate")
    with pytest.raises(HttpError) as caught:
        check_task(EMBED, "generate")
    assert caught.value.status == 400 and caught.value.param == "model" and "/v1/embeddings" in caught.value.message
    with pytest.raises(HttpError, match="text-generation model"):
        check_task(CHAT, "embedding")


def test_answers_are_openai_lists_with_float_or_little_endian_base64_vectors():
    reply = replica_pb2.EmbedResponse(embeddings=[replica_pb2.Embedding(values=[0.5, -0.25]),
                                                  replica_pb2.Embedding(values=[1.0, 0.0])],
                                      prompt_tokens=7, dimensions=2)
    job = parse({"model": "minilm", "input": ["a", "b"]})
    out = answer(job, reply)
    assert out == {"object": "list", "model": "minilm", "usage": {"prompt_tokens": 7, "total_tokens": 7},
                   "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.25]},
                            {"object": "embedding", "index": 1, "embedding": [1.0, 0.0]}]}
    b64 = answer(parse({"model": "minilm", "input": ["a", "b"], "encoding_format": "base64"}), reply)
    assert struct.unpack("<2f", base64.b64decode(b64["data"][0]["embedding"])) == (0.5, -0.25)
    assert base64_floats([1.0]) == base64.b64encode(struct.pack("<f", 1.0)).decode()
