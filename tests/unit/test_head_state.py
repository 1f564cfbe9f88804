"""The head's SQLite store: deployments and placements survive a restart; bad rows do not break loading."""
import sqlite3

from gridserve.common.model_config import ModelConfig
from gridserve.head.state import Assignment, Deployment, StateStore


def config(name: str, cpus: float = 1) -> ModelConfig:
    return ModelConfig.from_dict(name, {"source": {"type": "local", "path": "/models/x"}, "context_length": 64,
                                        "max_tokens_limit": 32, "sampling": {"max_new_tokens": 16},
                                        "resources": {"num_cpus": cpus}})


def test_deployments_round_trip_through_a_reopened_store(tmp_path):
    store = StateStore(tmp_path)
    store.put_deployment(Deployment("a", 2, config("a", cpus=2)))
    store.put_deployment(Deployment("b", 1, config("b")))
    store.put_deployment(Deployment("a", 3, config("a", cpus=2)))  # redeploy changes the count
    store.close()

    loaded = StateStore(tmp_path).load_deployments()
    assert sorted(loaded) == ["a", "b"]
    assert loaded["a"].replicas == 3
    assert loaded["a"].config == config("a", cpus=2)
    assert loaded["a"].updated > 0


def test_undeploy_removes_the_deployment_and_its_placements(tmp_path):
    store = StateStore(tmp_path)
    store.put_deployment(Deployment("a", 1, config("a")))
    store.put_deployment(Deployment("b", 1, config("b")))
    store.put_assignment(Assignment("a-000001", "a", "n1", 1.0))
    store.put_assignment(Assignment("b-000002", "b", "n1", 2.0))
    store.delete_deployment("a")
    store.close()

    again = StateStore(tmp_path)
    assert list(again.load_deployments()) == ["b"]
    assert list(again.load_assignments()) == ["b-000002"]


def test_placements_round_trip_and_can_be_deleted(tmp_path):
    store = StateStore(tmp_path)
    placed = [Assignment(f"m-00000{i}", "m", f"n{i}", float(i)) for i in range(3)]
    for a in placed:
        store.put_assignment(a)
    store.delete_assignments(["m-000001"])
    store.close()
    loaded = StateStore(tmp_path).load_assignments()
    assert list(loaded.values()) == [placed[0], placed[2]]


def test_a_row_whose_config_no_longer_validates_is_skipped_not_fatal(tmp_path):
    store = StateStore(tmp_path)
    store.put_deployment(Deployment("good", 1, config("good")))
    store.close()
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.execute("INSERT INTO deployments (model, replicas, config_json, updated) "
                   "VALUES ('broken', 1, '{\"name\": \"broken\"}', 0)")
    assert list(StateStore(tmp_path).load_deployments()) == ["good"]


def test_a_node_pin_round_trips_and_an_older_database_gains_the_column(tmp_path):
    with sqlite3.connect(tmp_path / "state.db") as db:  # the schema before deployments had a node pin
        db.execute("CREATE TABLE deployments (model TEXT PRIMARY KEY, replicas INTEGER NOT NULL, "
                   "config_json TEXT NOT NULL, updated REAL NOT NULL)")
        db.execute("INSERT INTO deployments VALUES ('old', 2, ?, 0)", (config("old").to_json(),))
    db.close()
    store = StateStore(tmp_path)
    assert store.load_deployments()["old"].node == ""
    store.put_deployment(Deployment("pinned", 1, config("pinned"), node="n7"))
    store.close()
    loaded = StateStore(tmp_path).load_deployments()
    assert loaded["pinned"].node == "n7" and loaded["old"].replicas == 2
