"""The one request contract: each field's bounds with the field named, the same verdict at the proxy and at
the replica for the same input, bounded error messages, the finish reason and the model config on the wire."""
from __future__ import annotations

import dataclasses
import json

import pytest

from gridserve.common.errors import ConfigError, GridserveError
from gridserve.common.model_config import ModelConfig
from gridserve.common.model_config_proto import (config_from_arg, config_from_proto, config_to_arg,
                                                 config_to_proto)
from gridserve.common.request_contract import (MAX_STOP_STRINGS, MAX_TOP_K, QUOTE_CHARS, FieldError,
                                               FinishReason, GenerationRequest, Sampling)
from gridserve.proxy.http_errors import HttpError
from gridserve.proxy.native_parse import parse_generate
from gridserve.proxy.native_wire import error_body as native_error_body
from gridserve.proxy.openai_parse import parse_chat
from gridserve.replica.request_params import resolve_request
from gridserve.v1 import model_config_pb2, replica_pb2

CONFIG = ModelConfig.from_dict("tiny", {"source": {"type": "local", "path": "/x"}, "context_length": 256,
                                        "max_tokens_limit": 64, "sampling": {"max_new_tokens": 32, "top_p": 0.9}})


def param_of(fields: dict) -> str | None:
    try:
        Sampling.from_fields(fields, CONFIG)
    except FieldError as e:
        return e.param
    return None


@pytest.mark.parametrize("field,good,bad", [
    ("max_tokens", [1, 64], [0, 65, -1, 1.0, "8", True, None]),
    ("temperature", [0, 0.0, 1e-300, 2, 2.0000001], [-0.1, 2.01, float("nan"), float("inf"), "1", False, None]),
    ("top_p", [1, 0.5, 1e-6, 1e-40], [0, 1e-300, -0.5, 1.01, float("nan"), "1", None]),
    ("top_k", [0, 1, MAX_TOP_K], [-1, MAX_TOP_K + 1, 2.0, "5", None]),
    ("seed", [0, 2**64 - 1], [-1, 2**64, 1.5, None]),
    ("stop", ["x", [], ["a"] * MAX_STOP_STRINGS, ["s" * 256]], ["", [""], ["a"] * (MAX_STOP_STRINGS + 1),
                                                                 ["s" * 257], [1], {"x": 1}, None]),
])
def test_each_sampling_field_has_bounds_and_a_refusal_names_it(field, good, bad):
    for value in good:
        assert param_of({field: value}) is None, (field, value)
    for value in bad:
        assert param_of({field: value}) == field, (field, value)


def test_max_tokens_is_bounded_by_the_models_own_limit():
    with pytest.raises(FieldError, match=r"'max_tokens' must be an integer in \[1, 64\] \(model 'tiny'"):
        Sampling.from_fields({"max_tokens": 65}, CONFIG)


def test_unset_fields_take_the_models_defaults_and_positive_top_p_stays_positive():
    opts = Sampling().resolve(CONFIG)
    assert (opts.max_tokens, opts.temperature, opts.top_p, opts.top_k, opts.seed, opts.stop) == \
        (32, 0.7, 0.9, 0, None, ())
    tiny = Sampling.from_fields({"top_p": 1e-40, "temperature": 1e-9}, CONFIG).resolve(CONFIG)
    assert tiny.top_p > 0 and tiny.temperature == 0  # a vanishing temperature is greedy


# The same input, sent by a client to the proxy and sent as is over gRPC to a replica.
SAME_VERDICT = [
    {"stop": list("abcde")},
    {"stop": list("abcd")},
    {"top_p": 1e-300},
    {"top_p": 1e-40},
    {"top_k": MAX_TOP_K},
    {"top_k": MAX_TOP_K + 1},
    {"top_k": 2**32 - 1},
    {"max_tokens": 0},
    {"max_tokens": 64},
    {"max_tokens": 65},
    {"temperature": 2.0000001},
    {"temperature": 2.001},
    {"stop": ["x" * 257]},
    {"stop": [""]},
]


def proxy_verdict(fields: dict) -> str | None:
    body = json.dumps({"prompt": "hi", **fields}).encode()
    try:
        parse_generate(body, "application/json", CONFIG, "r")
    except FieldError as e:
        return e.param
    return None


def replica_verdict(fields: dict) -> str | None:
    request = replica_pb2.GenerateRequest(prompt="hi", params=replica_pb2.SamplingParams(**fields))
    try:
        resolve_request(request, CONFIG)
    except FieldError as e:
        assert f"'{e.param}'" in e.message  # INVALID_ARGUMENT's message names the field
        return e.param
    return None


@pytest.mark.parametrize("fields", SAME_VERDICT, ids=[json.dumps(f)[:40] for f in SAME_VERDICT])
def test_the_proxy_and_the_replica_give_the_same_verdict_for_the_same_input(fields):
    assert proxy_verdict(fields) == replica_verdict(fields)


def test_five_stop_strings_and_a_vanishing_top_p_are_refused_on_both_sides_naming_the_field():
    assert proxy_verdict({"stop": list("abcde")}) == replica_verdict({"stop": list("abcde")}) == "stop"
    assert proxy_verdict({"top_p": 1e-300}) == replica_verdict({"top_p": 1e-300}) == "top_p"


def test_what_the_proxy_accepts_the_replica_accepts_unchanged():
    fields = {"max_tokens": 64, "temperature": 0.7, "top_p": 1e-6, "top_k": 40, "seed": 7, "stop": ["\n", "END"]}
    sent = parse_generate(json.dumps({"prompt": "hi", **fields}).encode(), "application/json", CONFIG, "r")
    kind, value, opts = resolve_request(sent, CONFIG)
    assert (kind, value) == ("prompt", "hi")
    assert (opts.max_tokens, opts.temperature, opts.top_p, opts.top_k, opts.seed, opts.stop) == \
        (64, 0.7, 1e-6, 40, 7, ("\n", "END"))


@pytest.mark.parametrize("grpc_request,param", [
    (replica_pb2.GenerateRequest(), "messages"),
    (replica_pb2.GenerateRequest(prompt=""), "prompt"),
    (replica_pb2.GenerateRequest(chat=replica_pb2.ChatMessages()), "messages"),
    (replica_pb2.GenerateRequest(chat=replica_pb2.ChatMessages(messages=[
        replica_pb2.ChatMessage(role="user", content="a"), replica_pb2.ChatMessage(role="robot", content="b")])),
     "messages[1].role"),
])
def test_malformed_input_over_grpc_is_refused_naming_the_field(grpc_request, param):
    with pytest.raises(FieldError) as err:
        GenerationRequest.from_proto(grpc_request, CONFIG)
    assert err.value.param == param


def test_a_checked_request_round_trips_through_its_proto():
    req = GenerationRequest("r", Sampling(max_tokens=3, stop=("x",)), messages=(("system", "s"), ("user", "u")),
                            resume_token_ids=(5, 6))
    assert GenerationRequest.from_proto(req.to_proto(), CONFIG) == req


def test_error_messages_never_echo_unbounded_input():
    huge = "x" * 100_000
    cases = [lambda: parse_generate(json.dumps({"prompt": "a", huge: 1}).encode(), "application/json", CONFIG, "r"),
             lambda: parse_generate(json.dumps({"prompt": "a", "model": huge}).encode(), "application/json",
                                    CONFIG, "r"),
             lambda: parse_generate(json.dumps({"messages": [{"role": huge, "content": "x"}]}).encode(),
                                    "application/json", CONFIG, "r"),
             lambda: parse_generate(json.dumps({"prompt": "a", "stop": [huge]}).encode(), "application/json",
                                    CONFIG, "r"),
             lambda: parse_chat(json.dumps({"model": "tiny", "messages": [], huge: 1}).encode(), "", "",
                                {"tiny": CONFIG}, "r"),
             lambda: parse_chat(json.dumps({"model": huge, "messages": []}).encode(), "", "", {"tiny": CONFIG}, "r")]
    for case in cases:
        with pytest.raises(GridserveError) as err:
            case()
        assert len(err.value.message) < 300, err.value.message[:400]
        assert len(getattr(err.value, "param", None) or "") <= QUOTE_CHARS


def test_the_native_error_body_names_the_field_in_its_own_shape():
    try:
        parse_generate(b'{"prompt": "a", "top_k": -1}', "application/json", CONFIG, "r")
    except FieldError as e:
        body = native_error_body(HttpError.from_gridserve(e))
    assert body["error"]["param"] == "top_k" and body["error"]["code"] == 400
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_finish_reason_is_one_enum_from_engine_strings_to_proto_and_back():
    for reason in FinishReason:
        assert FinishReason.from_proto(reason.to_proto()) is reason
        assert FinishReason(reason.value) is reason  # what an engine that speaks strings hands over
    assert FinishReason.from_proto(replica_pb2.FINISH_REASON_UNSPECIFIED) is None
    assert json.dumps({"finish_reason": FinishReason.LENGTH}) == '{"finish_reason": "length"}'


FULL = ModelConfig.from_dict("m", {
    "source": {"type": "hub", "repo": "org/m", "revision": "v2"}, "context_length": 512, "max_tokens_limit": 128,
    "sampling": {"temperature": 0.3, "top_p": 0.85, "top_k": 20, "max_new_tokens": 64},
    "resources": {"num_cpus": 2.5, "num_gpus": 1, "memory_mb": 4096}, "dtype": "bfloat16", "max_batch_size": 4,
    "max_waiting": 9, "description": "d", "stall_timeout_s": 7.5})


def test_model_config_round_trips_through_its_proto_and_argv_form():
    assert config_from_proto(config_to_proto(FULL)) == FULL
    assert config_from_arg(config_to_arg(FULL)) == FULL


def test_the_proto_mirrors_every_model_config_field():
    """A field added to the dataclass without the message would be lost on the way to a replica."""
    proto_fields = set(model_config_pb2.ModelConfig.DESCRIPTOR.fields_by_name)
    assert {f.name for f in dataclasses.fields(ModelConfig)} == proto_fields


def test_an_invalid_config_on_the_wire_is_refused_with_the_same_rules_as_the_file():
    msg = config_to_proto(FULL)
    msg.max_tokens_limit = 0
    with pytest.raises(ConfigError, match="max_tokens_limit: must be an integer in"):
        config_from_proto(msg)
    msg = config_to_proto(FULL)
    msg.dtype = "int4"
    with pytest.raises(ConfigError, match="dtype: must be one of"):
        config_from_proto(msg)
    with pytest.raises(ConfigError, match="'name' is empty"):
        config_from_proto(model_config_pb2.ModelConfig())
    for garbage in ("not base64!", "AAAA", ""):
        with pytest.raises(ConfigError, match="--model-config|name"):
            config_from_arg(garbage)


def test_every_catalog_model_crosses_the_wire_unchanged():
    """Each entry of the shipped model_configs.json (fake source and quantization included) survives argv."""
    from gridserve.common.model_config import load_model_catalog
    from gridserve.common.model_config_proto import config_from_arg, config_to_arg
    for name, config in load_model_catalog().models.items():
        assert config_from_arg(config_to_arg(config)) == config, name
