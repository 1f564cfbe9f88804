"""How far a STARTING replica of a hub model has filled the HF cache: bytes of the files it needs, and the rate."""
from __future__ import annotations

import asyncio
import contextlib
import logging

from gridserve.common.eventlog import event
from gridserve.scheduler.hf_cache import HubFile, RateMeter, bytes_present
from gridserve.v1 import head_pb2

log = logging.getLogger("gridserve.scheduler.download_watch")


class DownloadWatch:
    """Lists the repo's files once (off the loop); then each `sample` measures what of them is on disk.
    Reports nothing when everything is there already, the hub cannot be listed, or nothing moves."""

    def __init__(self, repo: str, revision: str = ""):
        self.repo, self.revision = repo, revision
        self.files: list[HubFile] | None = None  # None while listing; [] when the listing failed
        self.meter = RateMeter()
        self._listing: asyncio.Task | None = None

    def start(self) -> None:
        self._listing = asyncio.get_running_loop().create_task(self._list())

    def stop(self) -> None:
        if self._listing is not None:
            self._listing.cancel()

    async def _list(self) -> None:
        from gridserve.scheduler.model_pull import PullError, list_files
        try:
            _, self.files = await asyncio.to_thread(list_files, self.repo, self.revision)
        except PullError as e:
            self.files = []
            event(log, "download_watch_unlisted", repo=self.repo, reason=str(e)[:200])
        except Exception as e:  # the watch is a display: never let it hurt the replica
            self.files = []
            event(log, "download_watch_unlisted", logging.WARNING, repo=self.repo, reason=repr(e)[:200])

    def sample(self) -> head_pb2.ModelDownload | None:
        if not self.files:
            return None
        total = sum(f.size for f in self.files)
        done = 0
        with contextlib.suppress(OSError):
            done = bytes_present(self.repo, self.files)
        speed = self.meter.add(done)
        if done >= total:
            return None
        return head_pb2.ModelDownload(done_bytes=done, total_bytes=total, bytes_per_second=speed)
