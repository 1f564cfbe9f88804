"""The scheduler's view of hub files and memory: which files a pull fetches, checksums, rates, memory limits."""
import hashlib
from types import SimpleNamespace as NS

from gridserve.scheduler.hf_cache import HubFile, RateMeter, hub_files
from gridserve.scheduler.model_pull import checksum_ok
from gridserve.scheduler.replica_memory import over_limit, parse_compute_apps, process_rss


def sib(name: str, size: int = 10, lfs: str = "", blob: str = "b" * 40):
    return NS(rfilename=name, size=size, blob_id=blob, lfs=NS(sha256=lfs) if lfs else None)


def test_a_pull_takes_configs_tokenizer_and_one_kind_of_weights_at_the_top_level():
    siblings = [sib("config.json"), sib("tokenizer.json"), sib("merges.txt"), sib("model.safetensors", lfs="s" * 64),
                sib("pytorch_model.bin", lfs="p" * 64), sib("tf_model.h5", lfs="t" * 64), sib("onnx/model.onnx"),
                sib("README.md"), sib(".gitattributes"), sib("64-8bits.tflite")]
    names = [f.name for f in hub_files(siblings)]
    assert names == ["config.json", "tokenizer.json", "merges.txt", "model.safetensors"]
    only_bin = [sib("config.json"), sib("pytorch_model.bin", lfs="p" * 64), sib("pytorch_model.bin.index.json")]
    assert [f.name for f in hub_files(only_bin)] == ["config.json", "pytorch_model.bin", "pytorch_model.bin.index.json"]


def test_an_lfs_file_is_known_by_its_sha256_and_a_git_file_by_its_blob_sha1():
    lfs, git = hub_files([sib("model.safetensors", lfs="a" * 64), sib("config.json", blob="c" * 40)])
    assert (lfs.etag, lfs.sha256, git.etag, git.git_sha1) == ("a" * 64, "a" * 64, "c" * 40, "c" * 40)


def test_checksums_match_the_hubs_sha256_and_git_blob_sha1(tmp_path):
    data = b"weights" * 1000
    path = tmp_path / "blob"
    path.write_bytes(data)
    sha256, sha1 = hashlib.sha256(data).hexdigest(), hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    assert checksum_ok(path, HubFile("m.safetensors", len(data), sha256=sha256)) == (True, sha256)
    assert checksum_ok(path, HubFile("c.json", len(data), git_sha1=sha1)) == (True, sha1)
    assert checksum_ok(path, HubFile("m.safetensors", len(data), sha256="0" * 64)) == (False, sha256)


def test_the_rate_is_measured_over_the_last_seconds():
    meter = RateMeter(window=3.0)
    assert meter.add(0, now=0.0) == 0.0
    assert meter.add(10_000_000, now=1.0) == 10_000_000
    for t in range(2, 10):
        rate = meter.add(10_000_000 + (t - 1) * 1_000_000, now=float(t))
    assert rate == 1_000_000


def test_a_replica_is_over_its_limit_only_past_it_and_only_with_one():
    assert over_limit(700 << 20, 640 << 20) == "over its memory limit (640 MiB): RSS 700 MiB"
    assert over_limit(640 << 20, 640 << 20) == "" and over_limit(10 << 30, 0) == ""


def test_gpu_memory_per_process_comes_from_nvidia_smi_lines():
    assert parse_compute_apps("123, 2048\n456, 100\n123, 1024\n[N/A], 5\n") == {123: 3072 << 20, 456: 100 << 20}


def test_rss_of_this_process_is_measured_and_a_gone_process_has_none():
    import os
    assert process_rss(os.getpid()) > 10 << 20
    assert process_rss(2 ** 22 + 12345) == 0


async def test_gpu_memory_is_sampled_from_nvidia_smi_only_on_a_node_with_gpus(tmp_path, monkeypatch):
    import asyncio
    import os
    from gridserve.scheduler.replica_memory import GpuMemory
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '4242, 2048'\necho '7, 10'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert GpuMemory(0).get(4242) == 0 and GpuMemory(0).smi is None
    gpu = GpuMemory(1)
    assert gpu.get(4242) == 0  # the first call starts a sample
    await asyncio.wait_for(gpu._task, 5)
    assert gpu.get(4242) == 2048 << 20 and gpu.get(7) == 10 << 20 and gpu.get(1) == 0
