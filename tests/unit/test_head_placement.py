"""Placement rules of the head: spreading, resource fit, GPU constraint, scale-down order, pending message."""
from gridserve.head.placement import NodeCapacity, ReplicaView, choose_removals, pending_message, place
from gridserve.v1 import head_pb2

S = head_pb2


def test_replicas_spread_one_per_node_when_nodes_are_equal():
    nodes = [NodeCapacity("a", 4, 0), NodeCapacity("b", 4, 0), NodeCapacity("c", 4, 0)]
    chosen, _ = place(nodes, 1, 0, 3)
    assert sorted(chosen) == ["a", "b", "c"]


def test_the_node_with_most_free_cpus_is_chosen_first():
    nodes = [NodeCapacity("big-but-busy", 8, 0, used_cpus=7), NodeCapacity("small-idle", 2, 0)]
    chosen, after = place(nodes, 1, 0, 1)
    assert chosen == ["small-idle"]
    assert {n.node_id: n.used_cpus for n in after} == {"big-but-busy": 7, "small-idle": 1}


def test_placement_stops_when_no_node_has_room_and_returns_what_fit():
    nodes = [NodeCapacity("a", 2, 0), NodeCapacity("b", 1, 0)]
    chosen, after = place(nodes, 1, 0, 5)
    assert sorted(chosen) == ["a", "a", "b"]
    assert all(n.free_cpus == 0 for n in after)


def test_fractional_cpus_fit_exactly():
    chosen, _ = place([NodeCapacity("a", 1, 0)], 0.1, 0, 10)
    assert chosen == ["a"] * 10


def test_gpu_model_goes_only_to_a_node_with_a_free_gpu():
    nodes = [NodeCapacity("cpu-only", 16, 0), NodeCapacity("gpu", 4, 1)]
    chosen, _ = place(nodes, 4, 1, 2)
    assert chosen == ["gpu"]


def test_gpu_model_is_not_placed_without_any_gpu():
    chosen, _ = place([NodeCapacity("a", 64, 0)], 4, 1, 1)
    assert chosen == []


def test_scale_down_removes_non_ready_replicas_before_ready_ones():
    replicas = [
        ReplicaView("m-ready-old", S.REPLICA_STATE_READY, created=1),
        ReplicaView("m-ready-new", S.REPLICA_STATE_READY, created=5),
        ReplicaView("m-starting", S.REPLICA_STATE_STARTING, created=2),
        ReplicaView("m-failed", S.REPLICA_STATE_FAILED, created=3),
        ReplicaView("m-pending", S.REPLICA_STATE_PENDING, created=4),
    ]
    assert choose_removals(replicas, 3) == ["m-failed", "m-pending", "m-starting"]
    assert choose_removals(replicas, 4)[-1] == "m-ready-new"  # among ready ones the newest goes first
    assert choose_removals(replicas, 0) == []


def test_pending_message_names_the_missing_cpus_and_gpus():
    assert pending_message(1, 4, 1) == "1 replica(s) pending: no alive node has 4 free CPUs and 1 free GPU"
    assert pending_message(2, 1, 0) == "2 replica(s) pending: no alive node has 1 free CPU"
    assert pending_message(1, 0.5, 2) == "1 replica(s) pending: no alive node has 0.5 free CPUs and 2 free GPUs"


def test_a_replica_goes_only_to_a_node_with_the_memory_it_needs():
    gib = 1 << 30
    nodes = [NodeCapacity("small", 8, 0, memory_bytes=2 * gib, used_memory=gib), NodeCapacity("roomy", 2, 0,
                                                                                              memory_bytes=8 * gib)]
    chosen, after = place(nodes, 1, 0, 5, memory=3 * gib)
    assert chosen == ["roomy", "roomy"]
    assert {n.node_id: n.used_memory for n in after} == {"small": gib, "roomy": 6 * gib}


def test_a_node_that_reports_no_memory_is_not_held_to_a_memory_need():
    chosen, _ = place([NodeCapacity("old", 2, 0)], 1, 0, 1, memory=1 << 30)
    assert chosen == ["old"]


def test_pending_message_names_the_memory_a_replica_needs():
    assert pending_message(1, 1, 0, memory_mb=1200) == \
        "1 replica(s) pending: no alive node has 1 free CPU and 1200 MiB free memory"
    assert pending_message(2, 2, 1, "n1", memory_mb=512) == \
        "2 replica(s) pending: node n1 (pinned) does not have 2 free CPUs and 1 free GPU and 512 MiB free memory"
