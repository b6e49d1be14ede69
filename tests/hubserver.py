"""A stand-in for the Hugging Face Hub on 127.0.0.1, serving model repos from local folders (tests only).

It implements what ``huggingface_hub`` (2.x) calls for ``model_info``, ``list_repo_files``/``list_repo_tree``,
``hf_hub_download`` and ``snapshot_download``:

- ``GET /api/models/{repo}`` and ``GET /api/models/{repo}/revision/{rev}``: JSON with ``id``, ``sha`` and
  ``siblings`` (``[{"rfilename": ...}]``, plus ``size``/``blobId`` with ``?blobs=true``).
- ``GET /api/models/{repo}/tree/{rev}[/{path}]``: JSON list of ``{"type": "file"|"directory", "path", "oid",
  "size"[, "lfs"]}`` (``?recursive=true`` lists the whole tree; one page, no ``Link`` header).
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: the file with ``X-Repo-Commit``, ``ETag`` (git blob sha1, or the
  sha256 for LFS-like weights files), ``Content-Length``, ``Accept-Ranges``; ``Range: bytes=a-[b]`` gives a 206.
- Errors as the Hub sends them, with the headers huggingface_hub maps to exceptions: unknown repo -> 401
  ``X-Error-Code: RepoNotFound``; gated repo -> 401 ``GatedRepo``; unknown revision -> 404 ``RevisionNotFound``;
  unknown file -> 404 ``EntryNotFound`` (with ``X-Repo-Commit``).

A revision is a branch/tag name or its commit sha (derived from the folder's content). Every request is logged
as ``(method, path)`` (path unquoted, query dropped) in ``hub.log``; setting ``hub.outage = 503`` makes every
request fail with that status.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

_API = re.compile(r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)(?:/(?P<kind>revision|tree)/(?P<rev>[^/]+)(?:/(?P<path>.*))?)?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".msgpack", ".h5", ".pt", ".pth", ".onnx")


@dataclass
class _File:
    path: Path
    size: int
    blob_id: str  # git blob sha1
    sha256: str | None  # set for LFS-like files

    @property
    def etag(self) -> str:
        return f'"{self.sha256 or self.blob_id}"'


@dataclass
class _Revision:
    sha: str
    files: dict[str, _File] = field(default_factory=dict)


def _scan(folder: Path) -> _Revision:
    files: dict[str, _File] = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            name = p.relative_to(folder).as_posix()
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            sha256 = hashlib.sha256(data).hexdigest() if name.endswith(_LFS_SUFFIXES) else None
            files[name] = _File(p, len(data), blob, sha256)
    commit = hashlib.sha1(json.dumps({n: f.blob_id for n, f in files.items()}, sort_keys=True).encode()).hexdigest()
    return _Revision(commit, files)


class Hub(str):
    """The base URL of a running stand-in Hub (usable as a str), with its request log."""

    log: list[tuple[str, str]]
    outage: int | None  # set to e.g. 503 to make every request fail with that status (Hub down)

    def requests(self, method: str | None = None, kind: str = "resolve") -> list[str]:
        """Logged paths of ``kind`` ("resolve" file requests, "api", or "" for all), optionally of one method."""
        marker = {"resolve": "/resolve/", "api": "/api/", "": ""}[kind]
        return [p for m, p in list(self.log) if (method is None or m == method) and marker in p]

    def downloaded(self) -> set[str]:
        """File names fetched with GET (the part after ``/resolve/{rev}/``)."""
        return {p.split("/resolve/", 1)[1].split("/", 1)[1] for p in self.requests("GET")}


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._handle(body=False)

    def do_GET(self) -> None:
        self._handle(body=True)

    def _handle(self, body: bool) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        self.server.hub.log.append((self.command, path))
        if self.server.hub.outage:
            return self._error(self.server.hub.outage, None, "Service Unavailable", body)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if m := _API.match(url.path):
            repo = unquote(m["repo"])
            rev = self._revision(repo, unquote(m["rev"] or "main"), body)
            if rev is None:
                return
            if m["kind"] == "tree":
                return self._tree(rev, unquote(m["path"] or ""), query.get("recursive", "").lower() == "true", body)
            blobs = query.get("blobs", "").lower() == "true"
            siblings = [{"rfilename": n, **({"size": f.size, "blobId": f.blob_id} if blobs else {})}
                        for n, f in rev.files.items()]
            info = {"_id": rev.sha[:24], "id": repo, "modelId": repo, "sha": rev.sha, "private": False,
                    "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                    "lastModified": "2024-01-01T00:00:00.000Z", "siblings": siblings}
            return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
        if m := _RESOLVE.match(url.path):
            rev = self._revision(unquote(m["repo"]), unquote(m["rev"]), body)
            if rev is not None:
                self._file(rev, unquote(m["path"]), body)
            return
        self._error(404, None, "Not Found", body)

    def _revision(self, repo: str, name: str, body: bool) -> _Revision | None:
        revisions = self.server.repos.get(repo)
        if revisions is None:
            self._error(401, "RepoNotFound", "Repository not found", body)
        elif repo in self.server.gated:
            self._error(401, "GatedRepo", "Access to model is restricted. You must be authenticated.", body)
        elif name in revisions:
            return revisions[name]
        else:
            for rev in revisions.values():
                if rev.sha == name:
                    return rev
            self._error(404, "RevisionNotFound", f"Invalid rev id: {name}", body)
        return None

    def _tree(self, rev: _Revision, prefix: str, recursive: bool, body: bool) -> None:
        prefix = prefix.strip("/")
        base = prefix + "/" if prefix else ""
        entries: dict[str, dict] = {}
        for name, f in rev.files.items():
            if not name.startswith(base):
                continue
            parts = name[len(base):].split("/")
            for depth in range(1, len(parts)):  # folders on the way
                folder = base + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "oid": "0" * 40, "size": 0, "path": folder})
            if recursive or len(parts) == 1:
                entry = {"type": "file", "oid": f.blob_id, "size": f.size, "path": name}
                if f.sha256:
                    entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
                entries[name] = entry
        if prefix and not entries:
            return self._error(404, "EntryNotFound", f"{prefix} does not exist on \"{rev.sha}\"", body,
                               {"X-Repo-Commit": rev.sha})
        self._send(200, json.dumps(list(entries.values())).encode(), {"Content-Type": "application/json"}, body)

    def _file(self, rev: _Revision, name: str, body: bool) -> None:
        f = rev.files.get(name)
        if f is None:
            return self._error(404, "EntryNotFound", "Entry not found", body, {"X-Repo-Commit": rev.sha})
        data = f.path.read_bytes()
        headers = {"X-Repo-Commit": rev.sha, "ETag": f.etag, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        status = 200
        rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "").strip())
        if rng and self.command == "GET":
            start, end = int(rng[1]), int(rng[2]) if rng[2] else len(data) - 1
            if start >= len(data):
                return self._error(416, None, "Range Not Satisfiable", body, {"Content-Range": f"bytes */{len(data)}"})
            data, status = data[start:end + 1], 206
            headers["Content-Range"] = f"bytes {start}-{start + len(data) - 1}/{f.size}"
        self._send(status, data, headers, body)

    def _error(self, status: int, code: str | None, message: str, body: bool, extra: dict | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers, body)

    def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    repos: dict[str, dict[str, _Revision]]
    gated: set[str]
    hub: Hub


@contextlib.contextmanager
def serve(repos: Mapping[str, Path | Mapping[str, Path]], *, gated: tuple[str, ...] = ()) -> Iterator[Hub]:
    """Run a stand-in Hub on a free port of 127.0.0.1 while the block runs; yield its base URL (a ``Hub``).

    Args:
        repos: repo id -> folder (served as revision ``main``), or repo id -> {revision name: folder}.
            Folders are read once, at start; each revision's commit sha is derived from its files.
        gated: repo ids that answer as gated repos (401 ``GatedRepo``).
    """
    server = _Server(("127.0.0.1", 0), _Handler)
    server.repos = {repo: {name: _scan(Path(folder)) for name, folder in
                           (revs.items() if isinstance(revs, Mapping) else [("main", revs)])}
                    for repo, revs in repos.items()}
    server.gated = set(gated)
    hub = server.hub = Hub(f"http://127.0.0.1:{server.server_address[1]}")
    hub.log, hub.outage = [], None
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def silent() -> Iterator[str]:
    """A base URL whose port accepts TCP connections but never answers (to test timeouts)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)  # connections complete in the kernel's backlog; nothing ever reads or replies
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()
