"""The `gridserve` CLI: tables, JSON output, argument checks, the machine commands, and a clean error when the
head is down."""
import json
import os
import subprocess
import sys
from pathlib import Path

from gridserve.cli.render import (models_data, models_table, node_caches, node_caches_table, render_status,
                                  status_json)
from gridserve.common.model_config import ModelConfig
from gridserve.common.model_config_proto import config_to_proto
from gridserve.v1 import head_pb2 as pb
from support.waiting import free_port as closed_port

GRIDSERVE = str(Path(sys.executable).parent / "gridserve")
BASE = {"source": {"type": "local", "path": "/x"}, "context_length": 64, "max_tokens_limit": 32,
        "sampling": {"max_new_tokens": 16}}


def model_config(name: str):
    return config_to_proto(ModelConfig.from_dict(name, BASE))


def cluster_status() -> pb.ClusterStatus:
    return pb.ClusterStatus(
        nodes=[pb.NodeStatus(node_id="n1", address="10.0.0.5", capacity=pb.Resources(num_cpus=4, num_gpus=1),
                             allocated=pb.Resources(num_cpus=1.5), available=pb.Resources(memory_bytes=3 << 30),
                             alive=True),
               pb.NodeStatus(node_id="n2", address="10.0.0.6", capacity=pb.Resources(num_cpus=2), alive=False)],
        deployments=[pb.DeploymentStatus(model="smollm2", replicas=2, ready=1, node="n1"),
                     pb.DeploymentStatus(model="gpt2", replicas=1, message="1 replica(s) failed: fatal: no hub")],
        replicas=[pb.ReplicaStatus(replica_id="smollm2-a1b2c3", model="smollm2", node_id="n1",
                                   address="10.0.0.5:40001", state=pb.REPLICA_STATE_READY, pid=11, restarts=2,
                                   rss_bytes=412 << 20, memory_limit_bytes=1200 << 20, gpu_bytes=0),
                  pb.ReplicaStatus(replica_id="gpt2-d4e5f6", model="gpt2", node_id="n1",
                                   state=pb.REPLICA_STATE_FAILED, message="fatal: no hub")],
        routes_version=7, proxy_address="127.0.0.1:8000", proxy_pid=99, proxy_restarts=1)


def row(text: str, first: str) -> list[str]:
    return next(line.split() for line in text.splitlines() if line.startswith(first + " "))


def test_status_table_shows_nodes_deployments_and_replicas():
    text = render_status(cluster_status())
    assert row(text, "n1") == ["n1", "10.0.0.5", "1.5/4", "0/1", "3.0GiB", "yes", "-"]
    assert row(text, "n2")[-2] == "no"
    assert row(text, "smollm2")[:3] == ["smollm2", "1/2", "n1"]
    assert " ".join(row(text, "gpt2")) == "gpt2 0/1 - 1 replica(s) failed: fatal: no hub"
    assert row(text, "smollm2-a1b2c3") == ["smollm2-a1b2c3", "smollm2", "n1", "10.0.0.5:40001", "READY",
                                           "412.0MiB/1.2GiB", "-", "2", "-", "-"]
    assert " ".join(row(text, "gpt2-d4e5f6")) == "gpt2-d4e5f6 gpt2 n1 - FAILED - - 0 - fatal: no hub"
    assert "127.0.0.1:8000 pid=99 restarts=1" in text


def test_a_replica_filling_the_hf_cache_shows_starting_downloading_with_percent_and_rate():
    r = pb.ReplicaStatus(replica_id="gpt2-1", model="gpt2", state=pb.REPLICA_STATE_STARTING,
                         download=pb.ModelDownload(done_bytes=45 << 20, total_bytes=100 << 20,
                                                   bytes_per_second=12 << 20))
    assert "STARTING (downloading 45%, 12.0MiB/s)" in render_status(pb.ClusterStatus(replicas=[r]))
    r.download.total_bytes = 0
    assert "STARTING (downloading 45.0MiB, 12.0MiB/s)" in render_status(pb.ClusterStatus(replicas=[r]))


def test_empty_cluster_renders_without_tables():
    text = render_status(pb.ClusterStatus())
    assert text.count("(none)") == 3 and "PROXY  (not running)" in text


def test_status_json_keeps_proto_field_names_and_zero_values():
    data = json.loads(status_json(cluster_status()))
    assert data["replicas"][1]["state"] == "REPLICA_STATE_FAILED"
    assert data["replicas"][1]["restarts"] == 0
    assert data["nodes"][0]["node_id"] == "n1"


HEAD_COMMANDS = (["status"], ["nodes"], ["deployments"], ["replicas"], ["deploy", "smollm2"],
                 ["deploy", "smollm2", "--node", "n1"], ["scale", "smollm2", "2"], ["undeploy", "smollm2"],
                 ["models"], ["logs", "smollm2-abcdef"], ["logs", "smollm2-abcdef", "--follow"], ["pull", "gpt2"])


def test_commands_against_a_head_that_is_down_print_one_line_and_exit_1():
    head = f"127.0.0.1:{closed_port()}"
    for args in HEAD_COMMANDS:
        res = subprocess.run([GRIDSERVE, *args, "--head", head], capture_output=True, text=True, timeout=30)
        assert res.returncode == 1, res
        assert res.stdout == ""
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"cannot reach the head at {head}: "), res.stderr


def test_bad_arguments_are_rejected_before_calling_the_head():
    res = subprocess.run([GRIDSERVE, "deploy", "smollm2", "--replicas", "0"], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 2 and "must be >= 1" in res.stderr
    res = subprocess.run([GRIDSERVE, "status", "--output", "yaml"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "invalid choice" in res.stderr
    res = subprocess.run([GRIDSERVE, "scale", "smollm2", "zero"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "expected a whole number" in res.stderr


def test_help_lists_every_command():
    res = subprocess.run([GRIDSERVE, "--help"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0
    for command in ("head", "scheduler", "replica", "proxy", "status", "nodes", "deployments", "replicas", "deploy",
                    "scale", "undeploy", "models", "logs", "pull", "hardware", "recommend", "up"):
        assert f"    {command}" in res.stdout, command


def test_models_view_marks_the_default_and_shows_deployed_counts():
    resp = pb.ModelsResponse(catalog_path="/x/model_configs.json", models=[
        pb.CatalogModel(name="smollm2", is_default=True, deployed=True, replicas=2, ready=1,
                        model_config=model_config("smollm2")),
        pb.CatalogModel(name="gpt2", model_config=model_config("gpt2"))])
    data = models_data(resp)
    assert [m["name"] for m in data["models"]] == ["smollm2", "gpt2"]
    assert data["models"][0]["config"]["context_length"] == 64 and "name" not in data["models"][0]["config"]
    text = models_table(data)
    assert row(text, "smollm2")[:3] == ["smollm2", "*", "1/2"] and row(text, "gpt2")[1] == "-"


def test_models_view_shows_which_nodes_hold_a_hub_model_in_their_cache():
    resp = pb.ModelsResponse(models=[pb.CatalogModel(name="gpt2", model_config=model_config("gpt2"),
                                                     cached_on=["n1", "n2"])])
    data = models_data(resp)
    assert data["models"][0]["cached_on"] == ["n1", "n2"]
    assert row(models_table(data), "gpt2")[6] == "n1,n2"
    st = pb.ClusterStatus(nodes=[pb.NodeStatus(node_id="n1", cached_models=[pb.CachedModel(
        repo="openai-community/gpt2", revisions=["a" * 40], refs=["main"], size_bytes=548 << 20)])])
    caches = node_caches(st)
    assert caches == [{"node": "n1", "repo": "openai-community/gpt2", "size_bytes": 548 << 20,
                       "revisions": ["a" * 40], "refs": ["main"]}]
    assert row(node_caches_table(caches), "n1") == ["n1", "openai-community/gpt2", "548.0MiB", "main", "a" * 12]


def run_json(*args: str) -> dict:
    res = subprocess.run([GRIDSERVE, *args, "--output", "json"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_hardware_reports_cores_memory_disk_and_gpus_as_json():
    hw = run_json("hardware")
    assert hw["cpus_logical"] >= 1 and hw["memory_total_bytes"] >= hw["memory_available_bytes"] > 0
    assert hw["disk_total_bytes"] >= hw["disk_free_bytes"] > 0 and isinstance(hw["gpus"], list)
    assert hw["torch"]


def test_recommend_puts_the_largest_fitting_model_first_and_says_why_others_do_not_fit(tmp_path):
    cpus = os.cpu_count() or 1
    configs = {"default_model": "small", "models": {
        "small": {**BASE, "resources": {"num_cpus": 1, "memory_mb": 10}},
        "bigger": {**BASE, "resources": {"num_cpus": 1, "memory_mb": 200}},
        "too-many-cpus": {**BASE, "resources": {"num_cpus": cpus + 1, "memory_mb": 10}},
        "needs-gpu": {**BASE, "resources": {"num_cpus": 1, "num_gpus": 64}},
        "too-much-memory": {**BASE, "resources": {"num_cpus": 1, "memory_mb": 2**30}}}}
    path = tmp_path / "models.json"
    path.write_text(json.dumps(configs))
    data = run_json("recommend", "--model-configs", str(path))
    rows = {r["model"]: r for r in data["models"]}
    assert [r["model"] for r in data["models"]][:2] == ["bigger", "small"]
    assert rows["small"]["fits"] and rows["small"]["replicas"] == cpus
    assert "CPUs" in rows["too-many-cpus"]["why_not"] and "GPU" in rows["needs-gpu"]["why_not"]
    assert "memory" in rows["too-much-memory"]["why_not"] and not rows["too-much-memory"]["fits"]
    assert data["machine"]["cpus_logical"] == cpus
