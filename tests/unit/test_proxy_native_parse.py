"""Proxy request parsing: every bad input gets InvalidRequest/NotFound with a clear message, good ones map onto GenerateRequest."""
import json

import pytest

from gridserve.common.model_config import ModelConfig
from gridserve.common.errors import InvalidRequest, NotFound
from gridserve.common.request_contract import lookup_model
from gridserve.proxy.native_parse import parse_generate
from gridserve.proxy.request_body import is_json, request_id_from

CONFIG = ModelConfig.from_dict("tiny", {
    "source": {"type": "local", "path": "/nowhere"},
    "context_length": 256,
    "max_tokens_limit": 64,
    "sampling": {"max_new_tokens": 32},
})
JSON = "application/json"


def parse_json(obj, config=CONFIG):
    body = obj if isinstance(obj, (bytes, str)) else json.dumps(obj)
    return parse_generate(body.encode() if isinstance(body, str) else body, JSON, config, "rid-1")


def bad(obj, match):
    with pytest.raises(InvalidRequest, match=match):
        parse_json(obj)


def test_plain_text_body_becomes_one_user_message_with_defaults():
    req = parse_generate("Hello there".encode(), "text/plain", CONFIG, "rid-1")
    assert req.request_id == "rid-1"
    assert req.WhichOneof("input") == "chat"
    assert [(m.role, m.content) for m in req.chat.messages] == [("user", "Hello there")]
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
        assert not req.params.HasField(name), name  # unset: the replica applies the model's defaults
    assert list(req.params.stop) == []


@pytest.mark.parametrize("content_type", ["", "application/octet-stream", "application/x-www-form-urlencoded"])
def test_non_json_content_types_are_treated_as_plain_text(content_type):
    req = parse_generate(b'{"prompt": "x"}', content_type, CONFIG, "r")
    assert req.chat.messages[0].content == '{"prompt": "x"}'


def test_json_media_type_detection():
    assert is_json("application/json; charset=utf-8")
    assert is_json("application/vnd.api+json")
    assert not is_json("text/plain")


def test_json_messages_and_all_sampling_fields():
    req = parse_json({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                      "max_tokens": 64, "temperature": 0, "top_p": 0.5, "top_k": 40, "seed": 2**64 - 1,
                      "stop": ["\n\n", "END"], "model": "tiny"})
    assert [(m.role, m.content) for m in req.chat.messages] == [("system", "be brief"), ("user", "hi")]
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed) == (64, 0.0, 0.5, 40, 2**64 - 1)
    assert p.HasField("temperature")  # 0 is sent (greedy), not dropped as unset
    assert list(p.stop) == ["\n\n", "END"]


def test_json_prompt_is_raw_text_and_stop_string_becomes_a_list():
    req = parse_json({"prompt": "Once upon", "stop": "."})
    assert req.WhichOneof("input") == "prompt" and req.prompt == "Once upon"
    assert list(req.params.stop) == ["."]


@pytest.mark.parametrize("body", [b"", b"   \n  "])
def test_empty_plain_body_is_rejected(body):
    with pytest.raises(InvalidRequest, match="empty"):
        parse_generate(body, "text/plain", CONFIG, "r")


def test_empty_json_body_and_non_utf8_body_are_rejected():
    with pytest.raises(InvalidRequest, match="empty"):
        parse_generate(b"", JSON, CONFIG, "r")
    with pytest.raises(InvalidRequest, match="UTF-8"):
        parse_generate(b"\xff\xfe hi", "text/plain", CONFIG, "r")


@pytest.mark.parametrize("body,match", [
    ("{not json", "not valid JSON"),
    ('{"prompt": "x", "temperature": NaN}', "not valid JSON"),
    ("[1, 2]", "must be a JSON object, got a list"),
    ('"hello"', "must be a JSON object, got a string"),
])
def test_invalid_json_is_rejected(body, match):
    bad(body, match)


@pytest.mark.parametrize("obj,match", [
    ({}, "exactly one of 'messages'"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "exactly one of"),
    ({"prompt": "a", "stream": True}, "unknown field 'stream'"),
    ({"prompt": "a", "model": "other"}, "the path names 'tiny'"),
    ({"prompt": ""}, "'prompt' must be a non-empty string, got an empty string"),
    ({"prompt": 5}, "'prompt' must be a non-empty string, got a number"),
    ({"messages": []}, "non-empty list"),
    ({"messages": "hi"}, "non-empty list"),
    ({"messages": ["hi"]}, r"messages\[0\] must be an object"),
    ({"messages": [{"role": "robot", "content": "x"}]}, r"messages\[0\].role must be one of"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\].content must be a string, got null"),
    ({"messages": [{"role": "user", "content": ["x"]}]}, r"content must be a string, got a list"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, r"unknown field 'name'"),
])
def test_wrong_shapes_and_field_types_are_rejected(obj, match):
    bad(obj, match)


@pytest.mark.parametrize("value", [0, -1, 65, 1.5, "10", True, None])
def test_max_tokens_must_be_an_int_within_the_models_limit(value):
    bad({"prompt": "a", "max_tokens": value}, r"'max_tokens' must be an integer in \[1, 64\]")


def test_max_tokens_at_the_limit_is_accepted():
    assert parse_json({"prompt": "a", "max_tokens": 64}).params.max_tokens == 64
    assert parse_json({"prompt": "a", "max_tokens": 1}).params.max_tokens == 1


@pytest.mark.parametrize("field,value,match", [
    ("temperature", -0.1, r"\[0, 2\]"),
    ("temperature", 2.5, r"\[0, 2\]"),
    ("temperature", "hot", r"\[0, 2\]"),
    ("temperature", False, r"\[0, 2\]"),
    ("top_p", 0, r"\(0, 1\]"),
    ("top_p", 1.01, r"\(0, 1\]"),
    ("top_k", -1, r"integer in \[0, 2147483647\]"),
    ("top_k", 2.0, r"integer in \[0, 2147483647\]"),
    ("seed", -5, "integer in"),
    ("seed", 2**64, "integer in"),
])
def test_sampling_values_out_of_range_or_of_the_wrong_type_are_rejected(field, value, match):
    bad({"prompt": "a", field: value}, f"'{field}' must be .*{match}")


@pytest.mark.parametrize("stop", [["a", "b", "c", "d", "e"], [""], "", [1], {"x": 1}, None])
def test_stop_must_be_a_string_or_up_to_four_strings(stop):
    bad({"prompt": "a", "stop": stop}, "'stop' must be a non-empty string or a list of up to 4")


def test_unknown_model_is_not_found_and_names_the_deployed_ones():
    with pytest.raises(NotFound, match=r"'nope' is not deployed \(deployed models: a, tiny\)"):
        lookup_model({"tiny": CONFIG, "a": CONFIG}, "nope")
    with pytest.raises(NotFound, match="deployed models: none"):
        lookup_model({}, "nope")
    assert lookup_model({"tiny": CONFIG}, "tiny") is CONFIG


def test_sane_client_request_ids_are_kept_and_others_replaced():
    assert request_id_from("abc-123_x.y:z") == "abc-123_x.y:z"
    for insane in (None, "", "has space", "x" * 129, "new\nline", "-leading-dash", "ünïcode"):
        rid = request_id_from(insane)
        assert rid != insane and len(rid) == 32 and rid.isalnum()
    assert request_id_from(None) != request_id_from(None)
