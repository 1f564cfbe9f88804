"""The dashboard's cluster JSON: a deployment shows its autoscaling state, or null for a fixed count."""
from gridserve.proxy.dashboard.cluster_view import deployment_json
from gridserve.v1 import head_pb2


def test_a_fixed_deployment_has_no_autoscaling_state():
    d = head_pb2.DeploymentStatus(model="m", replicas=2, ready=1)
    assert deployment_json(d)["autoscaling"] is None
    assert deployment_json(d)["ready"] == 1 and deployment_json(d)["replicas"] == 2


def test_an_autoscaled_deployment_shows_its_range_target_load_and_last_decision():
    d = head_pb2.DeploymentStatus(model="m", replicas=3, ready=3, autoscaling=head_pb2.AutoscalingStatus(
        min_replicas=0, max_replicas=8, target_ongoing_requests=2, load=5.5, last_decision="1 -> 3: load 5.5",
        last_decision_at=1700000000.0))
    assert deployment_json(d)["autoscaling"] == {"min": 0, "max": 8, "target": 2.0, "load": 5.5,
                                                 "last_decision": "1 -> 3: load 5.5",
                                                 "last_decision_at": 1700000000.0}
