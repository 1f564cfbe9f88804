"""OpenAI request parsing, answer encoding and API keys, without a network."""
import json

import pytest

from gridserve.common.model_config import ModelConfig
from gridserve.common.errors import InvalidRequest, NotFound
from gridserve.common.request_contract import FinishReason
from gridserve.proxy.auth import ApiKeys, bearer_token
from gridserve.proxy.http_errors import HttpError
from gridserve.proxy.openai_wire import ChatAnswer, CompletionAnswer, error_body
from gridserve.proxy.openai_parse import parse_chat, parse_completion
from gridserve.proxy.relay import Job, Result

CONFIG = ModelConfig.from_dict("tiny", {"source": {"type": "local", "path": "/x"}, "context_length": 256,
                                        "max_tokens_limit": 64, "sampling": {"max_new_tokens": 32}})
MODELS = {"tiny": CONFIG}
USER = [{"role": "user", "content": "hi"}]


def chat(**body):
    return parse_chat(json.dumps(body).encode(), "application/json", "", MODELS, "rid")


def completion(**body):
    return parse_completion(json.dumps(body).encode(), "text/plain", "", MODELS, "rid")


def test_chat_maps_onto_the_replica_request_with_unset_fields_left_to_the_model():
    job = chat(model="tiny", messages=[{"role": "developer", "content": "sys", "name": "x"},
                                       {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                    {"type": "text", "text": "b"}]}])
    assert job.model == "tiny" and not job.stream and not job.include_usage
    assert [(m.role, m.content) for m in job.generate.chat.messages] == [("system", "sys"), ("user", "ab")]
    assert not job.generate.params.HasField("max_tokens") and job.generate.request_id == "rid"


def test_nulls_are_not_given_and_max_completion_tokens_is_max_tokens():
    job = chat(model="tiny", messages=USER, max_tokens=None, temperature=None, max_completion_tokens=7,
               stream=True, stream_options={"include_usage": True}, user="u")
    assert job.generate.params.max_tokens == 7 and not job.generate.params.HasField("temperature")
    assert job.stream and job.include_usage


def test_completion_takes_a_string_or_a_list_of_one():
    assert completion(model="tiny", prompt="Once").generate.prompt == "Once"
    assert completion(model="tiny", prompt=["Once"], echo=False, best_of=1).generate.prompt == "Once"


@pytest.mark.parametrize("body,param,needle", [
    ({"messages": USER, "n": 2}, "n", "only n=1"),
    ({"messages": USER, "n": True}, "n", "only n=1"),
    ({"messages": USER, "presence_penalty": 1}, "presence_penalty", "only 0"),
    ({"messages": USER, "logprobs": True}, "logprobs", "not supported"),
    ({"messages": USER, "response_format": {"type": "json_object"}}, "response_format", "not supported"),
    ({"messages": USER, "functions": []}, "functions", "unrecognized"),
    ({"messages": USER, "stream": "yes"}, "stream", "true or false"),
    ({"messages": USER, "stream": True, "stream_options": {"x": 1}}, "stream_options", "include_usage"),
    ({"messages": USER, "max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens", "not both"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content", "only text"),
    ({"messages": [{"role": "assistant", "content": None}]}, "messages[0].content", "must be a string"),
    ({"messages": USER, "temperature": 3}, "temperature", "[0, 2]"),
])
def test_chat_fields_that_cannot_be_honoured_are_refused_naming_the_field(body, param, needle):
    with pytest.raises(InvalidRequest) as exc:
        chat(model="tiny", **body)
    assert exc.value.param == param and needle in exc.value.message


def test_unknown_model_is_not_found_with_openai_param_and_code():
    with pytest.raises(NotFound) as exc:
        chat(model="nope", messages=USER)
    err = HttpError.from_gridserve(exc.value)
    assert error_body(err) == {"error": {"message": "model 'nope' is not deployed (deployed models: tiny)",
                                         "type": "not_found_error", "param": "model", "code": "model_not_found"}}


def sse(data: bytes) -> list:
    return [json.loads(e[len("data: "):]) if e != "data: [DONE]" else "[DONE]"
            for e in data.decode().split("\n\n") if e]


def test_chat_answer_chunks_role_first_then_deltas_finish_usage_and_done():
    a = ChatAnswer(Job("tiny", None, stream=True, include_usage=True), "r1")
    events = sse(a.head() + a.delta("Hi") + a.tail(Result(FinishReason.LENGTH, 3, 1)))
    assert [e["choices"][0]["delta"] for e in events[:2]] == [{"role": "assistant", "content": ""},
                                                               {"content": "Hi"}]
    assert events[2]["choices"][0]["finish_reason"] == "length" and events[2]["usage"] is None
    assert events[3]["choices"] == [] and events[3]["usage"]["total_tokens"] == 4 and events[4] == "[DONE]"
    assert {e["id"] for e in events[:4]} == {"chatcmpl-r1"}
    assert not any("system_fingerprint" in e for e in events[:4])  # absent, never null
    failure = sse(a.failure(HttpError(503, "service_unavailable", "gone")))
    assert failure[0]["error"]["message"] == "gone" and failure[1] == "[DONE]"


def test_completion_answer_has_no_role_chunk_and_a_whole_body_with_usage():
    a = CompletionAnswer(Job("tiny", None), "r2")
    assert a.head() == b""
    whole = a.whole("text", Result(FinishReason.STOP, 2, 3))
    assert whole["object"] == "text_completion" and whole["id"] == "cmpl-r2"
    assert whole["choices"] == [{"index": 0, "text": "text", "logprobs": None, "finish_reason": "stop"}]
    assert whole["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    assert "system_fingerprint" not in whole


def test_api_keys_accept_only_their_keys_and_bearer_parsing():
    keys = ApiKeys(["sk-aaaaaaaa", "sk-bbbbbbbb"])
    assert keys and keys.accepts("sk-bbbbbbbb") and not keys.accepts("sk-cccccccc") and not keys.accepts("")
    assert not ApiKeys()
    assert bearer_token("Bearer  abc ") == "abc" and bearer_token("bearer abc") == "abc"
    assert bearer_token("Basic abc") == "" and bearer_token("") == ""
