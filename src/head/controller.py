"""The head's controller: deployments, node registry, placement and the level-triggered reconcile loop."""
from __future__ import annotations

import asyncio
import logging
import secrets
import time

from gridserve.common.model_config import ModelCatalog
from gridserve.common.model_config_proto import config_to_proto
from gridserve.common.errors import InvalidRequest, NotFound, Unavailable
from gridserve.common.eventlog import event
from gridserve.head.assignment_index import AssignmentIndex
from gridserve.head.autoscaler import autoscaling_settings, route_config, scaling_start
from gridserve.head.log_relay import LogRelay
from gridserve.head.node_registry import Node, Session
from gridserve.head.pull_relay import PullRelay
from gridserve.head.placement import NodeCapacity, ReplicaView, choose_removals, pending_message, place
from gridserve.head.route_table import EndpointKey, RouteKey, RouteTable
from gridserve.head.state import Assignment, Deployment, StateStore
from gridserve.v1 import head_pb2

log = logging.getLogger("gridserve.head")

MAX_REPLICAS = 64  # default of the head's --max-replicas
STATUS_CACHE_S = 1.0  # Status answers from one build for at most this long (and only until a change)
SLOW_PASS_S = 0.5  # a reconcile pass longer than this is logged (reconcile_slow)
TOMBSTONE_SECONDS = 120.0  # a replica the head removed is not adopted back for this long
S = head_pb2.ReplicaState
# The states as plain ints: head_pb2.ReplicaState.X is a Python-level attribute lookup, 10 µs each,
# and a pass over 10,000 replicas makes tens of thousands of them.
READY, FAILED, PENDING, STOPPING = (head_pb2.REPLICA_STATE_READY, head_pb2.REPLICA_STATE_FAILED,
                                   head_pb2.REPLICA_STATE_PENDING, head_pb2.REPLICA_STATE_STOPPING)


def new_replica_id(model: str) -> str:
    return f"{model}-{secrets.token_hex(3)}"


def state_name(state: int) -> str:
    return S.Name(state).removeprefix("REPLICA_STATE_")


class Controller:
    """Owns desired state and the node registry; every mutation wakes the reconcile loop."""

    def __init__(self, catalog: ModelCatalog, store: StateStore, routes: RouteTable, node_timeout: float = 10.0,
                 interval: float = 1.0, max_replicas: int = MAX_REPLICAS):
        self.catalog = catalog
        self.store = store
        self.routes = routes
        self.node_timeout = node_timeout
        # After a restart, nodes holding stored placements get longer than a heartbeat to come back: their
        # reconnect backoff and this head's own startup both eat into the time.
        self.reconnect_grace = 2 * node_timeout
        self.interval = interval
        self.max_replicas = max_replicas
        self.deployments: dict[str, Deployment] = {}
        self.assignments = AssignmentIndex()
        self.nodes: dict[str, Node] = {}
        self.messages: dict[str, str] = {}
        self.stopping = False  # set on head shutdown: closing sessions then is not losing nodes
        self.proxy_address = ""
        self.proxy_pid = 0
        self.proxy_restarts = 0
        self.reconcile_passes = 0  # counted for tests and operators: "nothing happened for N passes"
        self._tombstones: dict[str, float] = {}
        self.logs = LogRelay()
        self.pulls = PullRelay()
        self._version = 0
        self._wake = asyncio.Event()
        self._routes_warm = False  # see _routes_held
        self._routes_basis: tuple | None = None  # what the routes were last computed from, see _routes_stale
        self._endpoint_keys: dict[str, EndpointKey] = {}  # reused pass after pass: 10,000 tuples not rebuilt
        self._heard_from = 0.0  # monotonic end of this head's last stall: silence before it is not the nodes'
        self._status_cache: tuple[float, int, head_pb2.ClusterStatus] | None = None  # see status()
        self.autoscaler = None  # the head's Autoscaler: it calls autoscale_to and annotates status()

    # startup and the loop

    def load(self) -> None:
        """Reads stored deployments and placements; nodes holding placements get reconnect_grace to reconnect."""
        self.deployments = self.store.load_deployments()
        stored = self.store.load_assignments()
        now = time.monotonic()
        for a in stored.values():
            if a.model not in self.deployments:
                continue
            self.assignments[a.replica_id] = a
            node = self.nodes.setdefault(a.node_id, Node(a.node_id, awaiting=True, last_seen=now))
            node.awaiting = True
        self.store.delete_assignments([r for r in stored if r not in self.assignments])
        event(log, "state_loaded", deployments=len(self.deployments), replicas=len(self.assignments),
              path=self.store.path)

    def wake(self) -> None:
        self._status_cache = None
        self._routes_basis = None  # something changed: the next pass recomputes the routes
        self._wake.set()

    async def run(self) -> None:
        """Reconciles on every change and at least every `interval` seconds, until cancelled."""
        watch = asyncio.create_task(self._watch_own_stalls(), name="head-stall-watch")
        try:
            await self._loop()
        finally:
            watch.cancel()

    async def _watch_own_stalls(self, tick: float = 0.25, stall: float = 0.5) -> None:
        """When this head's own event loop was stalled or saturated (starved of CPU, long passes), reports
        sat unread in its sockets: nodes are timed from the end of the stall, not lost for the head's
        silence. (A node whose session breaks is still lost at once; this only delays loss by silence.)"""
        while True:
            t = time.monotonic()
            await asyncio.sleep(tick)
            late = time.monotonic() - t - tick
            if late > stall:
                self._heard_from = time.monotonic()
                event(log, "head_stalled", logging.WARNING, seconds=f"{late:.1f}")

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            started = time.monotonic()
            try:
                self.reconcile()
            except Exception:  # a bug in one pass must not stop the controller; the next pass retries
                log.exception("reconcile_failed")
            took = time.monotonic() - started
            if took > SLOW_PASS_S:
                event(log, "reconcile_slow", logging.WARNING, seconds=f"{took:.2f}", nodes=len(self.nodes),
                      replicas=len(self.assignments))
            # Wakes that come in a burst (1,000 nodes reconnecting) share passes: the loop spends at most
            # about a third of its time reconciling and keeps the rest for the sessions themselves.
            await asyncio.sleep(min(2 * took, self.interval))

    # admin

    def deploy(self, model: str, replicas: int, node: str = "", autoscaling_json: str = "") -> str:
        """Creates or replaces a deployment: model, replica count and node pin (empty: any node); autoscaled
        (replicas from its settings) when the catalog entry has an autoscaling block or fields are given."""
        config = self.catalog.get(model)
        if config is None:
            raise NotFound(f"model {model!r} is not in the catalog "
                           f"(known models: {', '.join(sorted(self.catalog.models))})")
        scaling = autoscaling_settings(config, autoscaling_json, self.deployments.get(model))
        if scaling is not None:
            replicas = scaling_start(scaling, self.deployments.get(model))
        else:
            self._check_replicas(replicas)
        if node and node not in self.nodes:
            raise NotFound(f"node {node!r} is not known to the head "
                           f"(nodes: {', '.join(sorted(self.nodes)) or 'none'})")
        old = self.deployments.get(model)
        retried = self._drop_failed(model) if old else []
        dep = Deployment(model, replicas, config, node=node, autoscaling=scaling)
        self.store.put_deployment(dep)
        self.deployments[model] = dep
        event(log, "deploy", model=model, replicas=replicas, node=node, previous=old.replicas if old else 0,
              retried_failed=len(retried))
        self.wake()
        pin = f" on node {node}" if node else ""
        pin += f" (autoscaled: {scaling.min_replicas}..{scaling.max_replicas})" if scaling else ""
        if old is None:
            return f"deployed {model} with {replicas} replica(s){pin}"
        note = f"; retrying {len(retried)} failed replica(s)" if retried else ""
        moved = f"; pinned to node {node}" if node and node != old.node else ""
        moved = moved or ("; unpinned" if old.node and not node else "")
        return f"{model}: replicas {old.replicas} -> {replicas}{pin if scaling else ''}{moved}{note}"

    def scale(self, model: str, replicas: int) -> str:
        """Changes the replica count of a deployed model; the rest of its spec stays."""
        dep = self.deployments.get(model)
        if dep is None:
            known = ", ".join(sorted(self.deployments)) or "none"
            raise NotFound(f"model {model!r} is not deployed (deployed: {known}); use deploy first")
        self._check_replicas(replicas)
        if dep.autoscaling is not None:
            a = dep.autoscaling
            raise InvalidRequest(f"{model} is autoscaled ({a.min_replicas}..{a.max_replicas} replicas); change "
                                 f"its range with `gridserve deploy {model} --min-replicas N --max-replicas M`")
        old = dep.replicas
        dep.replicas = replicas
        self.store.put_deployment(dep)
        event(log, "scale", model=model, replicas=replicas, previous=old)
        self.wake()
        return f"{model}: replicas {old} -> {replicas}"

    def autoscale_to(self, model: str, replicas: int) -> None:
        """The autoscaler's new replica count for a deployment: stored, then the reconcile loop fits it."""
        dep = self.deployments[model]
        dep.replicas = replicas
        self.store.put_deployment(dep)
        self.wake()

    def _check_replicas(self, replicas: int) -> None:
        if not 1 <= replicas <= self.max_replicas:
            raise InvalidRequest(f"replicas must be between 1 and {self.max_replicas} (the head's --max-replicas), "
                                 f"got {replicas}")

    def undeploy(self, model: str) -> str:
        if model not in self.deployments:
            known = ", ".join(sorted(self.deployments)) or "none"
            raise NotFound(f"model {model!r} is not deployed (deployed: {known})")
        del self.deployments[model]
        self.messages.pop(model, None)
        gone = list(self.assignments.of_model(model))
        self.store.delete_deployment(model)
        self._remove(gone, "undeployed")
        event(log, "undeploy", model=model, replicas=len(gone))
        self.wake()
        return f"undeployed {model} ({len(gone)} replica(s) stopping)"

    def _drop_failed(self, model: str) -> list[str]:
        """A repeated deploy retries the model's FAILED replicas: they are replaced by new ones."""
        failed = [a.replica_id for a in self.assignments.of_model(model).values()
                  if self._state(a) == FAILED]
        self._remove(failed, "redeployed after failure")
        return failed

    # node sessions

    def log_session(self, replica_id: str, node_id: str = "") -> Session:
        """The session of the node that holds `replica_id`'s log (the one it is placed on, the one that
        reports it, or `node_id` for a replica the head no longer tracks)."""
        if not node_id:
            a = self.assignments.get(replica_id)
            reporting = [n.node_id for n in self.nodes.values() if replica_id in n.reports]
            node_id = a.node_id if a else (reporting[0] if reporting else "")
        if not node_id:
            raise NotFound(f"replica {replica_id!r} is not known to the head (see `gridserve replicas`); "
                           f"for a removed replica pass the node it ran on")
        node = self.nodes.get(node_id)
        if node is None:
            known = ", ".join(sorted(self.nodes)) or "none"
            raise NotFound(f"node {node_id!r} is not known to the head (nodes: {known})")
        if not node.alive or node.session is None:
            raise Unavailable(f"node {node_id} is not connected; the log is on that machine under "
                              f"<work-dir>/logs/{replica_id}.log")
        return node.session

    def open_session(self, hello: head_pb2.NodeHello, peer: str = "") -> Session:
        if not hello.node_id:
            raise InvalidRequest("hello.node_id must not be empty")
        node = self.nodes.get(hello.node_id) or Node(hello.node_id)
        self.nodes[hello.node_id] = node
        if node.session is not None:
            node.session.close("replaced by a new session")
        session = Session(hello.node_id, peer)
        node.hostname, node.address = hello.hostname, hello.address
        node.capacity.CopyFrom(hello.capacity)
        node.session, node.sent_key, node.synced = session, None, False
        node.reports = {}  # what a previous session reported is stale; the first report says what runs
        reconnect = node.alive or node.awaiting
        node.alive = True
        self._seen(node)
        event(log, "node_joined", node=node.node_id, hostname=node.hostname, address=node.address,
              cpus=f"{node.capacity.num_cpus:g}", gpus=f"{node.capacity.num_gpus:g}", peer=peer,
              reconnect=reconnect)
        self.wake()
        return session

    def on_report(self, session: Session, report: head_pb2.NodeReport) -> None:
        node = self.nodes.get(session.node_id)
        if node is None or node.session is not session or session.closed:
            return
        self._seen(node)
        node.available.CopyFrom(report.available)
        node.cpu_percent = report.cpu_percent
        node.cached_models = list(report.cached_models)
        session.reports += 1
        old = node.reports
        node.reports = {r.replica_id: r for r in report.replicas}
        changed = len(old) != len(node.reports) or not node.synced
        for r in report.replicas:
            prev = old.get(r.replica_id)
            if prev is None or prev.state != r.state or prev.message != r.message or prev.address != r.address:
                changed = True
                event(log, "replica_state", replica=r.replica_id, node=node.node_id, state=state_name(r.state),
                      address=r.address, pid=r.pid, restarts=r.restarts, message=r.message)
        self._adopt(node, report.replicas)
        node.synced = node.alive
        if changed:  # a heartbeat that says nothing new does not need a reconcile pass (1,000 nodes send 1,000/s)
            self.wake()

    def close_session(self, session: Session, reason: str) -> None:
        session.close(reason)
        self.logs.node_gone(session.node_id, reason)
        self.pulls.node_gone(session.node_id, reason)
        if self.stopping:  # the head is going down, not the node: keep its replicas' assignments for adoption
            return
        node = self.nodes.get(session.node_id)
        if node is not None and node.session is session:
            node.session = None
            if node.alive:
                self._node_lost(node, reason)
            self.wake()

    def _seen(self, node: Node) -> None:
        node.last_seen, node.last_seen_wall, node.awaiting = time.monotonic(), time.time(), False

    def _adopt(self, node: Node, replicas) -> None:
        """Takes over replicas a (re)connecting node runs that the head does not know, while the count allows."""
        for r in replicas:
            if r.replica_id in self.assignments or r.replica_id in self._tombstones:
                continue
            dep = self.deployments.get(r.model)
            if dep is None or r.state == STOPPING:
                continue
            if len(self.assignments.of_model(r.model)) >= dep.replicas:
                continue
            a = Assignment(r.replica_id, r.model, node.node_id, time.time())
            self.assignments[a.replica_id] = a
            self.store.put_assignment(a)
            event(log, "replica_adopted", replica=a.replica_id, node=node.node_id, state=state_name(r.state))

    def _node_lost(self, node: Node, reason: str) -> None:
        node.alive = node.synced = node.awaiting = False
        node.sent_key = None
        node.reports = {}
        if node.session is not None:
            node.session.close(reason)
            node.session = None
            self.logs.node_gone(node.node_id, reason)
            self.pulls.node_gone(node.node_id, reason)
        gone = list(self.assignments.of_node(node.node_id))
        for rid in gone:
            self.assignments.pop(rid)
            self._endpoint_keys.pop(rid, None)
        self.store.delete_assignments(gone)
        event(log, "node_lost", logging.WARNING, node=node.node_id, reason=reason, replicas_lost=len(gone))

    # reconcile

    def reconcile(self) -> None:
        """One level-triggered pass: expire silent nodes, fit replica counts, push desired states, routes."""
        now = time.monotonic()
        self._tombstones = {r: t for r, t in self._tombstones.items() if now - t < TOMBSTONE_SECONDS}
        for node in list(self.nodes.values()):
            silent = now - max(node.last_seen, self._heard_from)
            if node.alive and silent > self.node_timeout:
                self._node_lost(node, f"no report for {silent:.1f}s")
            elif node.awaiting and silent > self.reconnect_grace:
                self._node_lost(node, f"did not reconnect within {self.reconnect_grace:g}s of the head starting")
        orphans = [a.replica_id for a in self.assignments.values() if a.model not in self.deployments]
        self._remove(orphans, "not deployed")
        for dep in self.deployments.values():
            self._fit(dep)
        self._push_desired()
        if not self._routes_held() and self._routes_stale() and self.routes.update(self._route_keys()):
            event(log, "routes_changed", version=self.routes.version,
                  endpoints=self.routes.endpoint_count())
        self.reconcile_passes += 1

    def _routes_stale(self) -> bool:
        """Whether the routes may have changed since they were last computed: a wake (a report that changed
        something, a session, an admin call) or a change of placements. A quiet periodic pass skips them."""
        basis = (self.assignments.generation_now(),
                 tuple((m, route_config(d)) for m, d in sorted(self.deployments.items())))
        stale, self._routes_basis = basis != self._routes_basis, basis
        return stale

    def _routes_held(self) -> bool:
        """After a restart the first table waits until every node holding stored placements has reported
        (or is given up): an earlier one would lack their replicas and empty the proxies' routes."""
        if not self._routes_warm:
            holders = [self.nodes[n] for n in self.assignments.node_ids() if n in self.nodes]
            self._routes_warm = not any(n.awaiting or (n.alive and not n.synced) for n in holders)
        return not self._routes_warm

    def _fit(self, dep: Deployment) -> None:
        """Adds or removes placements of one deployment until they match its replica count."""
        mine = list(self.assignments.of_model(dep.model).values())
        if dep.node:
            self._remove([a.replica_id for a in mine if a.node_id != dep.node], f"pinned to node {dep.node}")
            mine = [a for a in mine if a.node_id == dep.node]
        if len(mine) > dep.replicas:
            views = [ReplicaView(a.replica_id, self._state(a), a.created) for a in mine]
            self._remove(choose_removals(views, len(mine) - dep.replicas), "scaled down")
        pending = 0
        res = dep.config.resources
        if len(mine) < dep.replicas:
            want = dep.replicas - len(mine)
            nodes = [c for c in self._capacities() if not dep.node or c.node_id == dep.node]
            chosen, _ = place(nodes, res.num_cpus, res.num_gpus, want, memory=res.memory_mb * 2**20)
            placed = []
            for node_id in chosen:
                a = Assignment(new_replica_id(dep.model), dep.model, node_id, time.time())
                self.assignments[a.replica_id] = a
                placed.append(a)
                event(log, "replica_placed", replica=a.replica_id, model=dep.model, node=node_id)
            self.store.put_assignments(placed)
            pending = want - len(chosen)
        self.messages[dep.model] = self._message(dep, pending)

    def _message(self, dep: Deployment, pending: int) -> str:
        parts = []
        if pending:
            res = dep.config.resources
            parts.append(pending_message(pending, res.num_cpus, res.num_gpus, dep.node,
                                         dep.node in self.nodes and self.nodes[dep.node].alive, res.memory_mb))
        mine = self.assignments.of_model(dep.model)
        failed = [r for n in self.nodes.values() for r in n.reports.values()
                  if r.state == FAILED and r.replica_id in mine]
        if failed:
            parts.append(f"{len(failed)} replica(s) failed: {failed[0].message or 'no message'} "
                         f"(deploy again to retry)")
        waiting = sorted(n.node_id for n in self.nodes.values()
                         if n.awaiting and any(r in mine for r in self.assignments.of_node(n.node_id)))
        if waiting:
            parts.append(f"waiting for node(s) {', '.join(waiting)} to reconnect")
        return "; ".join(parts)

    def _capacities(self) -> list[NodeCapacity]:
        """Alive, synced nodes with what is already placed on them. Free memory is the smaller of capacity minus
        the memory_mb placed there and what the node last reported free (other processes use memory too)."""
        out = []
        for n in self.nodes.values():
            if n.alive and n.synced:
                used = self._allocated(n.node_id)
                memory = n.capacity.memory_bytes
                if memory and n.available.memory_bytes:
                    memory = min(memory, used.memory_bytes + n.available.memory_bytes)
                out.append(NodeCapacity(n.node_id, n.capacity.num_cpus, n.capacity.num_gpus,
                                        used.num_cpus, used.num_gpus, memory, used.memory_bytes))
        return out

    def _remove(self, replica_ids: list[str], reason: str) -> None:
        now = time.monotonic()
        for rid in replica_ids:
            self._endpoint_keys.pop(rid, None)
            a = self.assignments.pop(rid, None)
            if a is not None:
                self._tombstones[rid] = now
                event(log, "replica_removed", replica=rid, model=a.model, node=a.node_id, reason=reason)
        self.store.delete_assignments(replica_ids)

    def _push_desired(self) -> None:
        configs = {m: d.config.to_json() for m, d in self.deployments.items()}  # cheap to compare
        generation = tuple(sorted(configs.items()))
        protos: dict[str, object] = {}

        def proto(model: str):  # the config as it travels, built once per model per pass
            if model not in protos:
                protos[model] = config_to_proto(self.deployments[model].config)
            return protos[model]
        for node in self.nodes.values():
            if not (node.alive and node.synced and node.session):
                continue
            # Unchanged placements on the node and unchanged configs: nothing to compare (the common case).
            fast = (self.assignments.generation(node.node_id), generation)
            if node.sent_key is not None and node.sent_fast == fast:
                continue
            node.sent_fast = fast
            mine = sorted(self.assignments.of_node(node.node_id).values(), key=lambda a: a.replica_id)
            key = tuple((a.replica_id, configs[a.model]) for a in mine)
            if key == node.sent_key:
                continue
            specs = [head_pb2.ReplicaSpec(replica_id=a.replica_id, model=a.model, model_config=proto(a.model))
                     for a in mine]
            self._version += 1
            node.session.push(head_pb2.DesiredState(version=self._version, replicas=specs))
            node.sent_key = key
            event(log, "desired_sent", node=node.node_id, version=self._version, replicas=len(specs))

    def _route_keys(self) -> list[RouteKey]:
        routes = []
        for dep in self.deployments.values():
            endpoints = []
            for a in self.assignments.of_model(dep.model).values():
                node = self.nodes.get(a.node_id)
                st = node.reports.get(a.replica_id) if node and node.alive else None
                if st is not None and st.state == READY and st.address:
                    key = self._endpoint_keys.get(a.replica_id)
                    if key is None or key.address != st.address or key.node_id != a.node_id:
                        key = self._endpoint_keys[a.replica_id] = EndpointKey(a.replica_id, st.address, a.node_id)
                    endpoints.append(key)
            routes.append(RouteKey(dep.model, route_config(dep), tuple(endpoints)))
        return routes

    # status

    def _state(self, a: Assignment) -> int:
        """The replica's reported state (PENDING when its node has not reported it), without a copy."""
        node = self.nodes.get(a.node_id)
        reported = node.reports.get(a.replica_id) if node else None
        return reported.state if reported is not None else PENDING

    def replica_status(self, a: Assignment) -> head_pb2.ReplicaStatus:
        node = self.nodes.get(a.node_id)
        reported = node.reports.get(a.replica_id) if node else None
        if reported is not None:
            out = head_pb2.ReplicaStatus()
            out.CopyFrom(reported)
            out.node_id, out.model = a.node_id, a.model
            return out
        message = f"waiting for node {a.node_id} to reconnect" if node and node.awaiting else ""
        return head_pb2.ReplicaStatus(replica_id=a.replica_id, model=a.model, node_id=a.node_id,
                                      state=PENDING, message=message, state_since=a.created)

    def _allocated(self, node_id: str) -> head_pb2.Resources:
        out = head_pb2.Resources()
        for a in self.assignments.of_node(node_id).values():
            dep = self.deployments.get(a.model)
            if dep:
                out.num_cpus += dep.config.resources.num_cpus
                out.num_gpus += dep.config.resources.num_gpus
                out.memory_bytes += dep.config.resources.memory_mb * 1024 * 1024
        return out

    def status(self) -> head_pb2.ClusterStatus:
        """The cluster as Status tells it; one build serves every caller until something changes or a second
        passes (every proxy polls it: 10 of them at 10,000 replicas would keep the head busy building it)."""
        now, generation = time.monotonic(), self.assignments.generation_now()
        cached = self._status_cache
        if cached is None or now - cached[0] > STATUS_CACHE_S or cached[1] != generation:
            cached = self._status_cache = (now, generation, self._build_status())
        return cached[2]

    def _build_status(self) -> head_pb2.ClusterStatus:
        out = head_pb2.ClusterStatus(routes_version=self.routes.version, proxy_address=self.proxy_address,
                                     proxy_pid=self.proxy_pid, proxy_restarts=self.proxy_restarts,
                                     reconcile_passes=self.reconcile_passes)
        for node in sorted(self.nodes.values(), key=lambda n: n.node_id):
            out.nodes.append(head_pb2.NodeStatus(
                node_id=node.node_id, hostname=node.hostname, address=node.address, capacity=node.capacity,
                allocated=self._allocated(node.node_id), available=node.available,
                cpu_percent=node.cpu_percent, alive=node.alive, last_seen=node.last_seen_wall,
                cached_models=node.cached_models))
        for dep in sorted(self.deployments.values(), key=lambda d: d.model):
            ready = sum(1 for a in self.assignments.of_model(dep.model).values()
                        if self._state(a) == READY)
            out.deployments.append(head_pb2.DeploymentStatus(
                model=dep.model, replicas=dep.replicas, ready=ready, message=self.messages.get(dep.model, ""),
                node=dep.node))
        if self.autoscaler is not None:
            self.autoscaler.annotate(out)
        for a in sorted(self.assignments.values(), key=lambda a: (a.model, a.created, a.replica_id)):
            out.replicas.append(self.replica_status(a))
        return out

    def catalog_models(self) -> head_pb2.ModelsResponse:
        """Every model of the catalog, with its deployment (desired and ready replicas) if it has one."""
        ready = {d.model: d.ready for d in self.status().deployments}
        out = head_pb2.ModelsResponse(catalog_path=self.catalog.path)
        for name, config in sorted(self.catalog.models.items()):
            dep = self.deployments.get(name)
            repo = config.source.repo if config.source.type == "hub" else None
            cached_on = sorted(n.node_id for n in self.nodes.values() if any(c.repo == repo for c in n.cached_models))
            out.models.append(head_pb2.CatalogModel(
                name=name, model_config=config_to_proto(config), deployed=dep is not None,
                replicas=dep.replicas if dep else 0, ready=ready.get(name, 0),
                is_default=name == self.catalog.default_model, cached_on=cached_on))
        return out
