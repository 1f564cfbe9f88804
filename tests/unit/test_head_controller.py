"""The head's controller with its real SQLite store, driven by simulated node sessions (no network)."""
import pytest

from gridserve.common.model_config import ModelCatalog
from gridserve.common.errors import InvalidRequest, NotFound, Unavailable
from gridserve.head.controller import Controller
from gridserve.head.route_table import RouteTable
from gridserve.head.state import StateStore
from gridserve.v1 import head_pb2 as pb

READY, FAILED, STARTING = pb.REPLICA_STATE_READY, pb.REPLICA_STATE_FAILED, pb.REPLICA_STATE_STARTING


def model(cpus: float = 1, gpus: float = 0) -> dict:
    return {"source": {"type": "local", "path": "/models/x"}, "context_length": 64, "max_tokens_limit": 32,
            "sampling": {"max_new_tokens": 16}, "resources": {"num_cpus": cpus, "num_gpus": gpus}}


CATALOG = ModelCatalog.from_dict({"default_model": "m", "models": {
    "m": model(), "other": model(), "gpu": model(cpus=4, gpus=1)}})


def controller(state_dir, node_timeout: float = 10.0) -> Controller:
    ctl = Controller(CATALOG, StateStore(state_dir), RouteTable(), node_timeout=node_timeout)
    ctl.load()
    ctl.reconcile()
    return ctl


def join(ctl: Controller, node_id: str, cpus: float = 4, gpus: float = 0, replicas=()):
    session = ctl.open_session(pb.NodeHello(node_id=node_id, hostname=node_id, address=f"{node_id}.local",
                                            capacity=pb.Resources(num_cpus=cpus, num_gpus=gpus)))
    ctl.on_report(session, pb.NodeReport(replicas=list(replicas)))
    ctl.reconcile()
    return session


def running(replica_id: str, model: str = "m", state: int = READY, message: str = "", port: int = 7000):
    return pb.ReplicaStatus(replica_id=replica_id, model=model, state=state, address=f"h:{port}", pid=port,
                            message=message)


def report_all(ctl: Controller, session, state: int = READY, message: str = "") -> list[pb.ReplicaStatus]:
    """The node reports every replica it was asked to run in `state`."""
    node = ctl.nodes[session.node_id]
    specs = [a for a in ctl.assignments.values() if a.node_id == node.node_id]
    reps = [running(a.replica_id, a.model, state, message, 7000 + i) for i, a in enumerate(specs)]
    ctl.on_report(session, pb.NodeReport(replicas=reps))
    ctl.reconcile()
    return reps


def test_deploy_spreads_replicas_and_sends_each_node_its_desired_state(tmp_path):
    ctl = controller(tmp_path)
    s1, s2 = join(ctl, "n1"), join(ctl, "n2")
    assert s1.take().replicas == [] and s2.take().replicas == []
    ctl.deploy("m", 2)
    ctl.reconcile()
    d1, d2 = s1.take(), s2.take()
    assert len(d1.replicas) == len(d2.replicas) == 1
    assert d2.version > d1.version > 0
    rid = d1.replicas[0].replica_id
    assert rid.startswith("m-") and len(rid) == len("m-") + 6
    ctl.reconcile()
    assert s1.take() is None  # nothing changed: nothing re-sent


def test_ready_replicas_join_the_routes_and_routes_change_only_on_real_changes(tmp_path):
    ctl = controller(tmp_path)
    session = join(ctl, "n1")
    ctl.deploy("m", 1)
    ctl.reconcile()
    v_deployed = ctl.routes.version
    assert [r.endpoints for r in ctl.routes.snapshot().routes] == [[]]
    report_all(ctl, session, STARTING)
    assert ctl.routes.version == v_deployed
    reps = report_all(ctl, session, READY)
    table = ctl.routes.snapshot()
    assert table.version == v_deployed + 1
    assert [(e.replica_id, e.address, e.node_id) for e in table.routes[0].endpoints] == \
        [(reps[0].replica_id, reps[0].address, "n1")]
    report_all(ctl, session, READY)  # a heartbeat with the same content
    assert ctl.routes.version == table.version


def test_failed_replica_stays_failed_with_its_message_and_is_not_replaced(tmp_path):
    ctl = controller(tmp_path)
    session = join(ctl, "n1")
    ctl.deploy("m", 1)
    ctl.reconcile()
    report_all(ctl, session, FAILED, "fatal: cannot load m: no network")
    for _ in range(3):
        ctl.reconcile()
    st = ctl.status()
    assert [(r.state, r.message) for r in st.replicas] == [(FAILED, "fatal: cannot load m: no network")]
    assert "failed: fatal: cannot load m" in st.deployments[0].message
    old = st.replicas[0].replica_id
    ctl.deploy("m", 1)  # deploying again retries with a new replica
    ctl.reconcile()
    assert [r.replica_id for r in ctl.status().replicas] != [old]
    assert [r.replica_id for r in session.take().replicas] != [old]


def test_scale_down_keeps_ready_replicas(tmp_path):
    ctl = controller(tmp_path)
    session = join(ctl, "n1")
    ctl.deploy("m", 3)
    ctl.reconcile()
    reps = report_all(ctl, session, READY)
    reps[1].state = STARTING
    ctl.on_report(session, pb.NodeReport(replicas=reps))
    ctl.deploy("m", 2)
    ctl.reconcile()
    assert sorted(r.replica_id for r in session.take().replicas) == sorted([reps[0].replica_id, reps[2].replica_id])


def test_model_that_fits_nowhere_is_pending_with_a_reason(tmp_path):
    ctl = controller(tmp_path)
    join(ctl, "n1", cpus=8)
    ctl.deploy("gpu", 1)
    ctl.reconcile()
    dep = ctl.status().deployments[0]
    assert (dep.ready, dep.message) == (0, "1 replica(s) pending: no alive node has 4 free CPUs and 1 free GPU")
    join(ctl, "g1", cpus=4, gpus=1)
    ctl.reconcile()
    assert [r.node_id for r in ctl.status().replicas] == ["g1"]
    assert ctl.status().deployments[0].message == ""


def test_a_node_whose_session_ends_is_dead_and_its_replicas_move(tmp_path):
    ctl = controller(tmp_path)
    s1 = join(ctl, "n1")
    ctl.deploy("m", 1)
    ctl.reconcile()
    report_all(ctl, s1, READY)
    s2 = join(ctl, "n2")
    assert len(ctl.routes.snapshot().routes[0].endpoints) == 1
    ctl.close_session(s1, "session ended by the node")
    ctl.reconcile()
    st = ctl.status()
    assert {n.node_id: n.alive for n in st.nodes} == {"n1": False, "n2": True}
    assert ctl.routes.snapshot().routes[0].endpoints == []
    assert [r.node_id for r in st.replicas] == ["n2"]
    assert len(s2.take().replicas) == 1


def test_a_silent_node_is_marked_dead_after_the_timeout(tmp_path):
    ctl = controller(tmp_path, node_timeout=5)
    session = join(ctl, "n1")
    ctl.nodes["n1"].last_seen -= 6
    ctl.reconcile()
    assert not ctl.status().nodes[0].alive
    assert session.closed


def test_replicas_a_reconnecting_node_runs_are_adopted_up_to_the_count(tmp_path):
    ctl = controller(tmp_path)
    ctl.deploy("m", 1)
    ctl.reconcile()
    session = join(ctl, "n1", replicas=[running("m-aaaaaa"), running("m-bbbbbb", port=7001),
                                        running("gone-cccccc", model="gone", port=7002)])
    desired = session.take()
    assert [r.replica_id for r in desired.replicas] == ["m-aaaaaa"]  # the others will be stopped
    assert [r.replica_id for r in ctl.status().replicas] == ["m-aaaaaa"]
    assert [e.replica_id for e in ctl.routes.snapshot().routes[0].endpoints] == ["m-aaaaaa"]


def test_after_a_head_restart_stored_placements_wait_for_their_node(tmp_path):
    ctl = controller(tmp_path)
    s1, s2 = join(ctl, "n1"), join(ctl, "n2")
    ctl.deploy("m", 2)
    ctl.reconcile()
    placed = {a.replica_id: a.node_id for a in ctl.assignments.values()}
    ctl.store.close()

    restarted = controller(tmp_path)  # a new head on the same state dir; nodes not back yet
    assert {a.replica_id: a.node_id for a in restarted.assignments.values()} == placed
    assert "waiting for node(s)" in restarted.status().deployments[0].message
    mine = [running(r, port=7000 + i) for i, (r, n) in enumerate(sorted(placed.items())) if n == "n1"]
    session = join(restarted, "n1", replicas=mine)
    assert [r.replica_id for r in session.take().replicas] == [r.replica_id for r in mine]
    assert {a.replica_id: a.node_id for a in restarted.assignments.values()} == placed  # nothing re-placed


def test_after_a_head_restart_a_node_gets_twice_the_node_timeout_to_reconnect(tmp_path):
    ctl = controller(tmp_path, node_timeout=10)
    join(ctl, "n1")
    ctl.deploy("m", 2)
    ctl.reconcile()
    ctl.store.close()

    restarted = controller(tmp_path, node_timeout=10)
    node = restarted.nodes["n1"]
    node.last_seen -= 15  # past one timeout: a reconnect backoff plus a slow start can take this long
    restarted.reconcile()
    assert node.awaiting and len(restarted.assignments) == 2
    assert restarted.routes.snapshot().routes == []  # the first table is still held back
    node.last_seen -= 6  # past twice the timeout: given up, its replicas are placed again elsewhere
    restarted.reconcile()
    assert not node.awaiting and restarted.assignments == {}
    assert [n for n in restarted.status().nodes if n.alive] == []


def test_admin_errors_name_the_problem(tmp_path):
    ctl = controller(tmp_path)
    with pytest.raises(NotFound, match="known models: gpu, m, other"):
        ctl.deploy("nope", 1)
    with pytest.raises(InvalidRequest, match="replicas must be between 1 and"):
        ctl.deploy("m", 0)
    with pytest.raises(NotFound, match="not deployed"):
        ctl.undeploy("m")
    assert ctl.deploy("m", 1) == "deployed m with 1 replica(s)"
    assert ctl.deploy("m", 3) == "m: replicas 1 -> 3"
    assert "undeployed m" in ctl.undeploy("m")
    assert ctl.status().deployments == []


def test_a_pinned_deployment_places_only_on_its_node_and_says_why_it_waits(tmp_path):
    ctl = controller(tmp_path)
    join(ctl, "n1", cpus=8)
    s2 = join(ctl, "n2", cpus=1)
    with pytest.raises(NotFound, match=r"node 'n9' is not known to the head \(nodes: n1, n2\)"):
        ctl.deploy("m", 1, node="n9")
    assert ctl.deploy("m", 2, node="n2") == "deployed m with 2 replica(s) on node n2"
    ctl.reconcile()
    st = ctl.status()
    assert [r.node_id for r in st.replicas] == ["n2"]  # n1 has room, but the pin says n2
    assert st.deployments[0].node == "n2"
    assert st.deployments[0].message == "1 replica(s) pending: node n2 (pinned) does not have 1 free CPU"
    ctl.close_session(s2, "gone")
    ctl.reconcile()
    assert ctl.status().deployments[0].message == "2 replica(s) pending: node n2 (pinned) is not alive"


def test_repinning_moves_replicas_and_scale_keeps_the_pin(tmp_path):
    ctl = controller(tmp_path)
    join(ctl, "n1")
    join(ctl, "n2")
    ctl.deploy("m", 2)
    ctl.reconcile()
    assert sorted(r.node_id for r in ctl.status().replicas) == ["n1", "n2"]
    assert ctl.deploy("m", 2, node="n1") == "m: replicas 2 -> 2; pinned to node n1"
    ctl.reconcile()
    assert [r.node_id for r in ctl.status().replicas] == ["n1", "n1"]
    assert ctl.scale("m", 3) == "m: replicas 2 -> 3"
    ctl.reconcile()
    assert [r.node_id for r in ctl.status().replicas] == ["n1", "n1", "n1"]
    assert ctl.deploy("m", 3) == "m: replicas 3 -> 3; unpinned"
    with pytest.raises(NotFound, match="'other' is not deployed"):
        ctl.scale("other", 1)
    with pytest.raises(InvalidRequest, match="between 1 and"):
        ctl.scale("m", 0)


def test_catalog_models_list_every_model_with_its_deployment(tmp_path):
    ctl = controller(tmp_path)
    session = join(ctl, "n1")
    ctl.deploy("m", 1)
    ctl.reconcile()
    report_all(ctl, session, READY)
    models = {m.name: m for m in ctl.catalog_models().models}
    assert sorted(models) == ["gpu", "m", "other"]
    assert (models["m"].deployed, models["m"].replicas, models["m"].ready, models["m"].is_default) == (True, 1, 1, True)
    assert not models["other"].deployed and models["other"].model_config.context_length == 64


def test_log_requests_go_to_the_session_of_the_replicas_node(tmp_path):
    ctl = controller(tmp_path)
    join(ctl, "n1")
    s2 = join(ctl, "n2")
    ctl.deploy("m", 1, node="n2")
    ctl.reconcile()
    rid = ctl.status().replicas[0].replica_id
    assert ctl.log_session(rid) is s2
    assert ctl.log_session("m-gone00", node_id="n2") is s2  # a replica the head no longer tracks
    with pytest.raises(NotFound, match="not known to the head"):
        ctl.log_session("m-gone00")
    ctl.close_session(s2, "gone")
    with pytest.raises(Unavailable, match="node n2 is not connected"):
        ctl.log_session(rid, node_id="n2")
