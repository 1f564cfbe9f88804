"""This node's Hugging Face cache: which hub files a model needs, what is on disk, and what is cached."""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from gridserve.common.eventlog import event
from gridserve.v1 import head_pb2

log = logging.getLogger("gridserve.scheduler.hf_cache")

# What transformers reads besides the weights: configs, tokenizer files, the chat template.
SIDE_FILE_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja", ".py")
WEIGHT_KINDS = ((".safetensors", ".safetensors.index.json"), (".bin", ".bin.index.json"))


@dataclass(frozen=True)
class HubFile:
    """One file of a repo at a commit, with what identifies its bytes: sha256 (LFS) or its git blob sha1."""
    name: str
    size: int
    sha256: str = ""     # LFS files
    git_sha1: str = ""   # plain git files

    @property
    def etag(self) -> str:
        """The name of its blob in the HF cache (what the hub sends as ETag / X-Linked-Etag)."""
        return self.sha256 or self.git_sha1


def hub_files(siblings) -> list[HubFile]:
    """The files a model load needs, from model_info(files_metadata=True) siblings: the side files at the top
    level and one kind of weights (safetensors if the repo has them, else pytorch .bin), nothing in subfolders."""
    top = [s for s in siblings if "/" not in s.rfilename]
    names = {s.rfilename for s in top}
    weights: tuple[str, ...] = ()
    for kind in WEIGHT_KINDS:
        if any(n.endswith(kind[0]) for n in names):
            weights = kind
            break
    out = []
    for s in top:
        n = s.rfilename
        is_weight = bool(weights) and (n.endswith(weights[0]) or n.endswith(weights[1]))
        other_weight = any(n.endswith(k[0]) for k in WEIGHT_KINDS) and not is_weight
        if other_weight or not (is_weight or n.endswith(SIDE_FILE_SUFFIXES)):
            continue
        lfs = getattr(s, "lfs", None)
        out.append(HubFile(n, int(s.size or 0), sha256=(lfs.sha256 if lfs else ""),
                           git_sha1="" if lfs else (s.blob_id or "")))
    return out


def hub_cache_dir() -> Path:
    """HF_HUB_CACHE as huggingface_hub resolved it for this process (HF_HOME, HF_HUB_CACHE, ~/.cache)."""
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


def repo_dir(repo: str) -> Path:
    return hub_cache_dir() / ("models--" + repo.replace("/", "--"))


def bytes_present(repo: str, files: list[HubFile]) -> int:
    """Bytes of `files` on disk: whole blobs, plus partial downloads (`<etag>*.incomplete`) of the others."""
    blobs = repo_dir(repo) / "blobs"
    total = 0
    for f in files:
        try:
            total += (blobs / f.etag).stat().st_size
            continue
        except OSError:
            pass
        for part in blobs.glob(f"{f.etag}*.incomplete"):
            try:
                total += part.stat().st_size
            except OSError:
                pass
    return total


def cached_models() -> list[head_pb2.CachedModel]:
    """The hub models in this node's HF cache (huggingface_hub's own scan), largest first."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(hub_cache_dir())
    except CacheNotFound:
        return []
    except (OSError, ValueError) as e:
        event(log, "hf_cache_scan_failed", logging.WARNING, error=str(e)[:200])
        return []
    out = []
    for repo in sorted(info.repos, key=lambda r: (-r.size_on_disk, r.repo_id)):
        if repo.repo_type != "model":
            continue
        revisions = sorted(repo.revisions, key=lambda r: r.commit_hash)
        out.append(head_pb2.CachedModel(repo=repo.repo_id, revisions=[r.commit_hash for r in revisions],
                                        refs=sorted(ref for r in revisions for ref in r.refs),
                                        size_bytes=repo.size_on_disk))
    return out


class RateMeter:
    """Bytes per second over the last few seconds, from (time, bytes-so-far) samples."""

    def __init__(self, window: float = 3.0):
        self.window = window
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, done: int, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[0][0] > self.window:
            self.samples.popleft()
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        return max(0.0, (b1 - b0) / (t1 - t0)) if t1 > t0 else 0.0
