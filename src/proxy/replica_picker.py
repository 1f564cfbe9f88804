"""Which replica gets a request: the power of two choices on in-flight counts, and cache-aware routing on
top of it (a prompt sharing a long prefix with one a replica served recently goes back to that replica,
whose prefix cache likely holds it, unless that replica is much busier than the least busy one)."""
from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict

from gridserve.proxy.route_cache import Endpoint, RouteCache
from gridserve.v1 import replica_pb2

BLOCK_CHARS = 128        # prefixes are compared in blocks of this many characters of the prompt
MIN_BLOCKS = 2           # a shorter shared prefix (256 characters) is not worth a busier replica
MAX_ENTRIES = 50_000     # prefix blocks remembered per proxy (least recently used first out)
SLACK_ABS, SLACK_REL = 2, 0.5  # the prefix's replica may have min + max(2, 50% of min) streams in flight
MAX_HOLDERS = 4          # replicas remembered per prefix block (a system prompt every replica has served)
ROUTINGS = ("prefix", "p2c")  # the proxy's --routing: cache-aware over p2c, or the power of two choices alone


def prompt_text(request: replica_pb2.GenerateRequest) -> str:
    """The text a replica's prefix cache sees first: the chat messages in order, or the raw prompt."""
    if request.HasField("chat"):
        return "".join(f"\x00{m.role}\x01{m.content}" for m in request.chat.messages)
    return request.prompt


def block_hashes(model: str, text: str) -> list[bytes]:
    """A hash of each whole-block prefix of `text`, shortest first (a rolling SHA-1 over the blocks)."""
    h = hashlib.sha1(model.encode())
    out = []
    for end in range(BLOCK_CHARS, len(text) + 1, BLOCK_CHARS):
        h.update(text[end - BLOCK_CHARS:end].encode())
        out.append(h.copy().digest())
    return out


def power_of_two_choices(table: RouteCache, model: str,
                         exclude: set[str] | frozenset = frozenset()) -> Endpoint | None:
    """Of two random endpoints of the model not in `exclude`, the one with fewer streams in flight."""
    route = table.routes.get(model)
    candidates = [e for e in route.endpoints if e.address not in exclude] if route else []
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    a, b = table.rng.sample(candidates, 2)
    return a if table.inflight(a.address) <= table.inflight(b.address) else b


class PrefixAffinity:
    """Which replicas (addresses) last served each prefix block, for every model this proxy serves. With
    routing "p2c" it remembers nothing and every pick is the power of two choices."""

    def __init__(self, max_entries: int = MAX_ENTRIES, routing: str = "prefix"):
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")
        self.max_entries, self.routing = max_entries, routing
        self._holders: OrderedDict[bytes, dict[str, None]] = OrderedDict()  # block -> replicas, latest last
        self.routed = self.matched = 0  # requests routed here, and those sent to their prefix's replica

    def pick(self, table: RouteCache, model: str, request: replica_pb2.GenerateRequest,
             exclude: set[str] | frozenset = frozenset()) -> Endpoint | None:
        """The replica holding the longest remembered prefix of the request (of several, the least busy),
        within the load bound; else the power of two choices. Remembers the request's prefix blocks on the
        chosen replica."""
        if self.routing == "p2c":
            chosen = power_of_two_choices(table, model, exclude)
            self.routed += chosen is not None
            return chosen
        hashes = block_hashes(model, prompt_text(request))
        chosen = self._affine(table, model, hashes, exclude) or power_of_two_choices(table, model, exclude)
        if chosen is not None:
            self.routed += 1
            self._remember(hashes, chosen.address)
        return chosen

    def _remember(self, hashes: list[bytes], address: str) -> None:
        for h in hashes:
            holders = self._holders.pop(h, None) or {}
            holders.pop(address, None)
            holders[address] = None
            if len(holders) > MAX_HOLDERS:
                del holders[next(iter(holders))]
            self._holders[h] = holders  # to the end: the least recently used block goes first
        while len(self._holders) > self.max_entries:
            self._holders.popitem(last=False)

    def _affine(self, table: RouteCache, model: str, hashes: list[bytes], exclude) -> Endpoint | None:
        route = table.routes.get(model)
        candidates = {e.address: e for e in (route.endpoints if route else ()) if e.address not in exclude}
        if len(candidates) < 2:
            return None
        for n in range(len(hashes), MIN_BLOCKS - 1, -1):  # the longest match first
            holders = [a for a in reversed(self._holders.get(hashes[n - 1], {})) if a in candidates]
            if holders:  # a prefix several replicas hold (a shared system prompt) spreads like p2c
                best = min(holders, key=table.inflight)  # the latest holder on a tie
                least = min(table.inflight(a) for a in candidates)
                if table.inflight(best) <= least + max(SLACK_ABS, SLACK_REL * least):
                    self.matched += 1
                    return candidates[best]
                return None  # its replicas are too busy: balance instead
        return None


_BY_TABLE: "weakref.WeakKeyDictionary[RouteCache, PrefixAffinity]" = weakref.WeakKeyDictionary()


def affinity_of(table: RouteCache) -> PrefixAffinity:
    """The prefix memory that goes with a proxy's routing table (one per proxy; "prefix" routing unless
    `use_routing` said otherwise)."""
    affinity = _BY_TABLE.get(table)
    if affinity is None:
        affinity = _BY_TABLE[table] = PrefixAffinity()
    return affinity


def use_routing(table: RouteCache, routing: str) -> PrefixAffinity:
    """Sets how the proxy owning `table` picks replicas: "prefix" (cache-aware) or "p2c" (its --routing)."""
    affinity = _BY_TABLE[table] = PrefixAffinity(routing=routing)
    return affinity
