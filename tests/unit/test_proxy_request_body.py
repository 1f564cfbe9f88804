"""Request bodies the parsers refuse before using: JSON nested too deep, text with lone surrogates, and
error messages that stay bounded whatever the input echoed in them."""
import json

import pytest

from gridserve.common.errors import InvalidRequest
from gridserve.proxy.http_errors import MAX_MESSAGE, HttpError, cap_message
from gridserve.proxy.native_parse import parse_generate
from gridserve.proxy.openai_parse import parse_chat
from gridserve.proxy.request_body import MAX_DEPTH, safe_json_loads
from gridserve.common.model_config import ModelConfig

CONFIG = ModelConfig.from_dict("tiny", {"source": {"type": "local", "path": "/x"}, "context_length": 256,
                                        "max_tokens_limit": 64, "sampling": {"max_new_tokens": 32}})


def test_json_nested_past_the_recursion_limit_is_a_clear_400_not_a_crash():
    for depth in (MAX_DEPTH + 1, 900, 100_000):
        body = '{"messages": ' + "[" * depth + "]" * depth + "}"
        with pytest.raises(InvalidRequest, match=f"nested more than {MAX_DEPTH} levels deep"):
            safe_json_loads(body)


def test_json_at_the_depth_limit_still_parses():
    nested = "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)
    assert safe_json_loads('{"x": ' + nested + "}")["x"] == json.loads(nested)


@pytest.mark.parametrize("body, param", [
    ('{"prompt": "a\\ud800b"}', "prompt"),
    ('{"messages": [{"role": "user", "content": "ok"}, {"role": "user", "content": "\\udfff"}]}',
     "messages[1].content"),
    ('{"stop": ["x", "\\ud83d"]}', "stop[1]"),
    ('{"metadata": {"k": {"deep": ["\\udc00"]}}}', "metadata.k.deep[0]"),
])
def test_a_lone_surrogate_is_refused_naming_the_field(body, param):
    with pytest.raises(InvalidRequest) as e:
        safe_json_loads(body)
    assert e.value.param == param and e.value.code == "invalid_unicode"
    assert param in e.value.message and "invalid Unicode" in e.value.message


def test_a_surrogate_pair_is_valid_text_and_a_lone_one_in_a_key_is_refused():
    assert safe_json_loads('{"prompt": "\\ud83d\\ude00"}')["prompt"] == "\U0001F600"
    with pytest.raises(InvalidRequest, match="field name in messages\\[0\\] holds invalid Unicode"):
        safe_json_loads('{"messages": [{"\\ud800": 1}]}')


def test_both_parsers_refuse_surrogates_before_building_a_replica_request():
    with pytest.raises(InvalidRequest, match="prompt holds invalid Unicode"):
        parse_generate(b'{"prompt": "\\ud800"}', "application/json", CONFIG, "r")
    body = b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}'
    with pytest.raises(InvalidRequest, match="messages\\[0\\].content holds invalid Unicode"):
        parse_chat(body, "application/json", "", {"tiny": CONFIG}, "r")


def test_error_messages_are_capped_keeping_their_start_and_end():
    long = "unknown field '" + "k" * 100_000 + "' (known fields: messages, prompt)"
    capped = cap_message(long)
    assert len(capped) <= MAX_MESSAGE
    assert capped.startswith("unknown field 'kkk") and capped.endswith("(known fields: messages, prompt)")
    assert HttpError(400, "invalid_request_error", long).message == capped
    assert cap_message("short") == "short"


def test_a_huge_unknown_field_name_does_not_come_back_whole():
    with pytest.raises(InvalidRequest) as e:
        parse_generate(json.dumps({"prompt": "x", "k" * 50_000: 1}).encode(), "application/json", CONFIG, "r")
    assert len(HttpError.from_gridserve(e.value).message) <= MAX_MESSAGE
