"""Pulls a hub model into this node's HF cache for the head: verified, resumable, progress up the session.

The listing comes from huggingface_hub's `model_info` (sizes, LFS sha256, git blob ids); each missing
file is fetched with its `http_get` into `blobs/<etag>.incomplete`, which stays when a pull is cut, so
the next pull resumes it with a Range request; a finished file is checked against its sha256 (LFS) or
git sha1 before it becomes the blob; `hf_hub_download` then links the snapshot and the ref, so a
replica's `from_pretrained` finds everything in the cache. The work runs in a thread; the event loop
sends a PullProgress every half second.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field

from gridserve.common.eventlog import event
from gridserve.scheduler.hf_cache import HubFile, RateMeter, bytes_present, hub_cache_dir, hub_files, repo_dir
from gridserve.v1 import head_pb2

log = logging.getLogger("gridserve.scheduler.model_pull")

LIST_TIMEOUT_S = 10.0  # the first hub call: a node without a route to the hub fails within this
PROGRESS_INTERVAL_S = 0.5
HASH_CHUNK = 1 << 20
DOWNLOAD_CHUNK = 1 << 20


class PullError(Exception):
    """A pull that cannot finish on this node, with a message for the operator."""


class PullCancelled(Exception):
    """The head cancelled the pull (its caller went away); the partial file stays for a resume."""


@dataclass
class PullState:
    """What the pulling thread has found and done so far, read by the progress loop."""
    repo: str
    revision: str = ""
    commit: str = ""
    files: list[HubFile] = field(default_factory=list)
    files_done: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)


def _endpoint() -> str:
    from huggingface_hub import constants
    return constants.ENDPOINT


def _network_error(err: BaseException) -> bool:
    e: BaseException | None = err
    while e is not None:
        name = type(e).__name__
        if isinstance(e, (ConnectionError, TimeoutError)) or name in (
                "ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "NetworkError"):
            return True
        e = e.__cause__ or e.__context__
    return False


def list_files(repo: str, revision: str) -> tuple[str, list[HubFile]]:
    """(commit, the files a load needs) from the hub; PullError at once when the hub cannot be reached."""
    from huggingface_hub import HfApi, constants, errors

    if constants.HF_HUB_OFFLINE:
        raise PullError("HF_HUB_OFFLINE is set on this node: it has no route to a hub")
    try:
        info = HfApi().model_info(repo, revision=revision or None, files_metadata=True, timeout=LIST_TIMEOUT_S)
    except errors.GatedRepoError:
        raise PullError(f"{repo} is gated: accept its licence on the hub and set HF_TOKEN on the node") from None
    except errors.RevisionNotFoundError:
        raise PullError(f"{repo} has no revision {revision!r} on the hub at {_endpoint()}") from None
    except errors.RepositoryNotFoundError:
        raise PullError(f"no repo {repo} on the hub at {_endpoint()} (or it is private: set HF_TOKEN)") from None
    except Exception as e:
        if _network_error(e):
            raise PullError(f"no route to the hub at {_endpoint()}: {_first_line(e)}") from None
        raise PullError(f"listing {repo} on the hub at {_endpoint()} failed: {_first_line(e)}") from None
    files = hub_files(info.siblings or [])
    if not files:
        raise PullError(f"{repo} has no model files (config, tokenizer, safetensors or .bin) at its top level")
    return info.sha or "", files


def checksum_ok(path, f: HubFile) -> tuple[bool, str]:
    """Whether the bytes at `path` are `f`'s (sha256 for LFS files, git blob sha1 otherwise), and the digest."""
    h = hashlib.sha256() if f.sha256 else hashlib.sha1(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    return digest == f.etag, digest


def _meter(cancel: threading.Event):
    """A progress class for http_get that only checks for a cancel between chunks."""

    class Meter:
        def __init__(self, **_kw):
            pass

        def update(self, _n: int) -> None:
            if cancel.is_set():
                raise PullCancelled()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    return Meter


def fetch_file(repo: str, commit: str, f: HubFile, cancel: threading.Event) -> None:
    """Downloads one missing file into blobs/<etag>.incomplete (resuming what is there), verifies it, moves it in."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    blobs = repo_dir(repo) / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    blob, part = blobs / f.etag, blobs / f"{f.etag}.incomplete"
    lock = hub_cache_dir() / ".locks" / repo_dir(repo).name / f"{f.etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):  # the lock hf_hub_download takes for this blob: no two writers
        if blob.exists():
            return
        headers = {**build_hf_headers(), "Accept-Encoding": "identity"}
        with open(part, "ab") as out:
            resume = out.tell()
            if resume > f.size:
                out.truncate(0)
                resume = 0
            if resume:
                event(log, "pull_resume", repo=repo, file=f.name, offset=resume, size=f.size)
            try:
                http_get(hf_hub_url(repo, f.name, revision=commit), out, resume_size=resume, headers=headers,
                         expected_size=f.size, displayed_filename=f.name, tqdm_class=_meter(cancel))
            except (PullCancelled, PullError):
                raise
            except Exception as e:
                raise PullError(f"downloading {f.name} from {_endpoint()} failed after "
                                f"{out.tell()} of {f.size} bytes (pull again to resume): {_first_line(e)}") from None
        ok, digest = checksum_ok(part, f)
        if not ok:
            part.unlink(missing_ok=True)
            kind = "sha256" if f.sha256 else "git sha1"
            raise PullError(f"checksum mismatch for {f.name}: the hub says {kind} {f.etag}, the downloaded "
                            f"bytes have {digest}; the file was deleted")
        os.replace(part, blob)


def link_snapshot(repo: str, revision: str, files: list[HubFile]) -> None:
    """hf_hub_download finds each blob present and adds the snapshot links and refs/<revision>."""
    from huggingface_hub import hf_hub_download

    for f in files:
        try:
            hf_hub_download(repo, f.name, revision=revision or "main")
        except Exception as e:
            raise PullError(f"linking {f.name} into the HF cache failed: {_first_line(e)}") from None


def pull_model(state: PullState) -> None:
    """The whole pull, blocking (run it in a thread): list, fetch what is missing, verify, link."""
    from huggingface_hub import constants
    from huggingface_hub.utils import disable_progress_bars
    disable_progress_bars()
    # http_get writes what it reads in pieces of this size: a cut download keeps whole pieces only, and
    # progress moves by them. The library's 10 MB would lose up to 10 MB per cut and report coarsely.
    constants.DOWNLOAD_CHUNK_SIZE = min(constants.DOWNLOAD_CHUNK_SIZE, DOWNLOAD_CHUNK)
    state.commit, state.files = list_files(state.repo, state.revision)
    blobs = repo_dir(state.repo) / "blobs"
    for f in state.files:
        if state.cancel.is_set():
            raise PullCancelled()
        blob = blobs / f.etag
        if blob.exists() and not checksum_ok(blob, f)[0]:
            event(log, "pull_bad_blob", logging.WARNING, repo=state.repo, file=f.name)
            blob.unlink()
        fetch_file(state.repo, state.commit, f, state.cancel)
        state.files_done += 1
    link_snapshot(state.repo, state.revision, state.files)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:240] if text else type(e).__name__


class ModelPulls:
    """The pulls the head asked for over one session: a task each, progress into the session's outbox."""

    def __init__(self, node_id: str, outbox: asyncio.Queue, on_done=lambda: None):
        self.node_id = node_id
        self.outbox = outbox
        self.on_done = on_done  # e.g. rescan the cache so the next report lists the model
        self.tasks: dict[str, asyncio.Task] = {}

    def open(self, req: head_pb2.ModelPullRequest) -> None:
        event(log, "pull_start", stream=req.stream_id, repo=req.repo, revision=req.revision or "main")
        self.tasks[req.stream_id] = asyncio.create_task(self._run(req), name=f"pull-{req.stream_id}")

    def cancel(self, stream_id: str) -> None:
        task = self.tasks.pop(stream_id, None)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        tasks, self.tasks = list(self.tasks.values()), {}
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    def _progress(self, req, state: PullState, meter: RateMeter, **end) -> head_pb2.PullProgress:
        done = bytes_present(state.repo, state.files) if state.files else 0
        return head_pb2.PullProgress(
            stream_id=req.stream_id, node_id=self.node_id, repo=req.repo, revision=state.commit, done_bytes=done,
            total_bytes=sum(f.size for f in state.files), bytes_per_second=meter.add(done),
            files_done=state.files_done, files_total=len(state.files), **end)

    async def _send(self, msg: head_pb2.PullProgress) -> None:
        await self.outbox.put(head_pb2.NodeMessage(pull_progress=msg))

    async def _run(self, req: head_pb2.ModelPullRequest) -> None:
        state, meter = PullState(req.repo, req.revision), RateMeter()
        work = asyncio.ensure_future(asyncio.to_thread(pull_model, state))
        started = time.monotonic()
        try:
            while not work.done():
                await asyncio.wait({work}, timeout=PROGRESS_INTERVAL_S)
                if state.files and not work.done():
                    await self._send(self._progress(req, state, meter))
            work.result()
            await self._send(self._progress(req, state, meter, done=True))
            event(log, "pull_done", stream=req.stream_id, repo=req.repo, commit=state.commit,
                  files=len(state.files), seconds=f"{time.monotonic() - started:.1f}")
        except PullError as e:
            event(log, "pull_failed", logging.WARNING, stream=req.stream_id, repo=req.repo, error=str(e))
            await self._send(self._progress(req, state, meter, error=str(e)))
        except asyncio.CancelledError:
            state.cancel.set()  # the thread stops at its next chunk; the partial file stays
            raise
        except Exception as e:  # a bug or an OS error: say it, do not end the session
            event(log, "pull_failed", logging.ERROR, stream=req.stream_id, repo=req.repo, error=repr(e))
            await self._send(self._progress(req, state, meter, error=f"pull failed on the node: {_first_line(e)}"))
        finally:
            state.cancel.set()
            self.tasks.pop(req.stream_id, None)
            self.on_done()
