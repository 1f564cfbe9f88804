"""Cache-aware routing: a conversation goes back to the replica that served its prefix, within a load bound."""
import random

import pytest

from gridserve.proxy.replica_picker import PrefixAffinity, affinity_of, block_hashes, use_routing
from gridserve.proxy.route_cache import RouteCache
from gridserve.v1 import head_pb2, replica_pb2
from support.fakes import model_config

SYSTEM = "You are a helpful assistant who answers questions about the history of computing. " * 4  # ~340 chars
ADDRESSES = [f"10.0.0.{i}:1" for i in range(1, 5)]


def table_of(addresses=ADDRESSES, seed=0) -> RouteCache:
    table = RouteCache(rng=random.Random(seed))
    snapshot = head_pb2.RoutingTable(version=1)
    route = snapshot.routes.add(model="tiny", model_config=model_config("tiny"))
    for i, a in enumerate(addresses):
        route.endpoints.add(replica_id=f"tiny-{i}", address=a)
    table.apply(snapshot)
    return table


def chat(*turns: str) -> replica_pb2.GenerateRequest:
    r = replica_pb2.GenerateRequest()
    r.chat.messages.add(role="system", content=SYSTEM)
    for i, t in enumerate(turns):
        r.chat.messages.add(role="user" if i % 2 == 0 else "assistant", content=t)
    return r


def test_each_turn_of_a_conversation_goes_back_to_the_replica_that_served_the_last():
    table, affinity = table_of(), PrefixAffinity()
    for conversation in range(8):
        turns = [f"question {conversation}: tell me about the ENIAC and its programmers, in detail please"]
        first = affinity.pick(table, "tiny", chat(*turns)).address
        for turn in range(4):
            turns += [f"an answer of some length about turn {turn} " * 3, f"follow-up {turn}?"]
            assert affinity.pick(table, "tiny", chat(*turns)).address == first
    # a first turn matches the shared system prompt too (and nothing is in flight here to spread them)
    assert (affinity.routed, affinity.matched) == (40, 39)


def test_a_much_busier_replica_loses_its_conversation_to_the_least_busy():
    table, affinity = table_of(), PrefixAffinity()
    first = affinity.pick(table, "tiny", chat("hello")).address
    table._inflight.update({a: 1 for a in ADDRESSES})
    table._inflight[first] = 3  # min 1 + 2: still within the bound
    assert affinity.pick(table, "tiny", chat("hello", "hi", "more")).address == first
    table._inflight[first] = 4
    assert affinity.pick(table, "tiny", chat("hello", "hi", "more", "x", "y")).address != first


def test_short_prompts_and_excluded_replicas_use_the_power_of_two_choices():
    table, affinity = table_of(), PrefixAffinity()
    short = replica_pb2.GenerateRequest(prompt="x" * 200)
    assert block_hashes("tiny", short.prompt) and len(block_hashes("tiny", short.prompt)) < 2
    picks = {affinity.pick(table, "tiny", short).address for _ in range(40)}
    assert len(picks) > 1 and affinity.matched == 0
    first = affinity.pick(table, "tiny", chat("hello")).address
    again = affinity.pick(table, "tiny", chat("hello", "hi", "more"), exclude={first})
    assert again.address != first


def test_the_memory_is_bounded_and_forgets_the_oldest_prefixes_first():
    table, affinity = table_of(), PrefixAffinity(max_entries=10)
    for i in range(20):
        affinity.pick(table, "tiny", replica_pb2.GenerateRequest(prompt=f"{i:04d}" + "y" * 400))
    assert len(affinity._holders) == 10


def test_p2c_routing_spreads_a_conversation_and_remembers_no_prefix():
    table = table_of()
    affinity = use_routing(table, "p2c")
    assert affinity_of(table) is affinity
    turns, served = ["tell me about the ENIAC and its programmers, in detail please"], set()
    for turn in range(10):
        served.add(affinity.pick(table, "tiny", chat(*turns)).address)
        turns += [f"an answer of some length about turn {turn} " * 3, f"follow-up {turn}?"]
    assert len(served) > 1 and (affinity.routed, affinity.matched) == (10, 0) and not affinity._holders
    assert use_routing(table, "prefix").routing == "prefix" and affinity_of(table).routing == "prefix"
    with pytest.raises(ValueError, match="routing must be one of prefix, p2c"):
        PrefixAffinity(routing="random")


def test_a_prefix_every_replica_holds_goes_to_the_least_busy_of_them_and_a_conversation_stays():
    table, affinity = table_of(ADDRESSES[:2]), PrefixAffinity()
    first = [f"conversation {i}: tell me about the ENIAC and its programmers, in detail please " * 2 for i in range(4)]
    a = affinity.pick(table, "tiny", chat(first[0])).address
    table._inflight[a] = 3  # the system prompt's only holder is busy: the next one balances to the other
    b = affinity.pick(table, "tiny", chat(first[1])).address
    assert b != a
    table._inflight.update({a: 1, b: 2})  # both hold the system prompt now: a new one goes to the less busy
    assert affinity.pick(table, "tiny", chat(first[2])).address == a
    table._inflight.update({a: 2, b: 1})
    assert affinity.pick(table, "tiny", chat(first[3])).address == b
    # each conversation's own turns go back where it started, within the load bound
    for conversation, where in ((0, a), (1, b), (2, a), (3, b)):
        assert affinity.pick(table, "tiny", chat(first[conversation], "an answer", "more?")).address == where
