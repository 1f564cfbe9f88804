"""A stand-in Hugging Face hub for tests: serves one folder as a model repo over the hub's file API.

`python tests/support/standin_hub.py --root DIR --repo org/name --port P` answers what huggingface_hub asks:
  GET  /api/models/{repo}[/revision/{rev}]   model info; with files metadata (size, blobId, lfs.sha256)
  HEAD|GET /{repo}/resolve/{rev}/{file}      X-Repo-Commit, ETag / X-Linked-Etag, X-Linked-Size,
                                             Content-Length, Range (206) like the real hub
Files named *.safetensors (or over 1 MB) are LFS files (etag = sha256), others git blobs (etag = git
sha1). --rate throttles bodies (bytes/s) so a test can kill the server mid-download; --corrupt FILE
serves that file with its bytes changed (same size, same advertised checksum); every request is
appended to --requests as a JSON line (method, path, range).
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
from pathlib import Path

from aiohttp import web

CHUNK = 64 * 1024
LFS_MIN_SIZE = 1 << 20


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repo:
    """The files of one folder as a hub repo at one commit."""

    def __init__(self, root: Path, repo_id: str):
        self.repo_id = repo_id
        self.files: dict[str, bytes] = {p.relative_to(root).as_posix(): p.read_bytes()
                                        for p in sorted(root.rglob("*")) if p.is_file()}
        listing = "\n".join(f"{n} {git_blob_sha1(d)}" for n, d in self.files.items())
        self.commit = hashlib.sha1(listing.encode()).hexdigest()

    def is_lfs(self, name: str) -> bool:
        return name.endswith(".safetensors") or len(self.files[name]) > LFS_MIN_SIZE

    def etag(self, name: str) -> str:
        data = self.files[name]
        return hashlib.sha256(data).hexdigest() if self.is_lfs(name) else git_blob_sha1(data)

    def sibling(self, name: str) -> dict:
        data = self.files[name]
        out = {"rfilename": name, "size": len(data), "blobId": git_blob_sha1(data)}
        if self.is_lfs(name):
            out["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return out


def hub_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers={"X-Error-Code": code,
                                                                         "X-Error-Message": message})


def make_app(repo: Repo, rate: float, corrupt: str, requests_log: Path | None) -> web.Application:
    def known(request: web.Request) -> web.Response | None:
        name = f"{request.match_info['org']}/{request.match_info['name']}"
        if name != repo.repo_id:
            return hub_error(404, "RepositoryNotFound", f"Repository {name} not found")
        rev = request.match_info.get("rev", "main")
        if rev not in ("main", repo.commit):
            return hub_error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return None

    @web.middleware
    async def record(request: web.Request, handler):
        if requests_log is not None:
            with open(requests_log, "a") as f:
                f.write(json.dumps({"method": request.method, "path": request.path,
                                    "range": request.headers.get("Range", "")}) + "\n")
        return await handler(request)

    async def info(request: web.Request) -> web.Response:
        if (err := known(request)) is not None:
            return err
        return web.json_response({"id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.commit,
                                  "private": False, "siblings": [repo.sibling(n) for n in repo.files]})

    async def resolve(request: web.Request) -> web.StreamResponse:
        if (err := known(request)) is not None:
            return err
        name = request.match_info["path"]
        if name not in repo.files:
            return hub_error(404, "EntryNotFound", f"{name} does not exist at {repo.commit}")
        data = repo.files[name]
        if name == corrupt:
            data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
        headers = {"X-Repo-Commit": repo.commit, "Accept-Ranges": "bytes"}
        etag = f'"{repo.etag(name)}"'
        if repo.is_lfs(name):
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(len(data)), "ETag": f'"{git_blob_sha1(data)}"'})
        else:
            headers["ETag"] = etag
        start, status = 0, 200
        if rng := request.headers.get("Range", ""):
            start = int(rng.removeprefix("bytes=").split("-")[0])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        headers["Content-Length"] = str(len(data) - start)
        if request.method == "HEAD":
            return web.Response(status=status, headers=headers)
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        for i in range(start, len(data), CHUNK):
            await resp.write(data[i:i + CHUNK])
            if rate:
                await asyncio.sleep(CHUNK / rate)
        await resp.write_eof()
        return resp

    app = web.Application(middlewares=[record])
    app.router.add_get("/api/models/{org}/{name}", info)
    app.router.add_get("/api/models/{org}/{name}/revision/{rev}", info)
    app.router.add_route("*", "/{org}/{name}/resolve/{rev}/{path:.+}", resolve)
    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--repo", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--rate", type=float, default=0.0, help="bytes/s per body (0: unthrottled)")
    p.add_argument("--corrupt", default="", help="serve this file with changed bytes")
    p.add_argument("--requests", type=Path, default=None, help="append each request here as a JSON line")
    a = p.parse_args(argv)
    repo = Repo(a.root, a.repo)
    print(f"serving {a.repo}@{repo.commit} ({len(repo.files)} files) on 127.0.0.1:{a.port}", flush=True)
    web.run_app(make_app(repo, a.rate, a.corrupt, a.requests), host="127.0.0.1", port=a.port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
