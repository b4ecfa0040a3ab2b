"""A fake Hugging Face Hub on 127.0.0.1: just the endpoints `huggingface_hub` 2.x calls to download and upload.

Downloads (`snapshot_download`):
    GET  /api/models/{repo}[/revision/{rev}]       repo info: sha (the commit) + siblings
    GET  /api/models/{repo}/tree/{rev}[/{path}]     file listing (?recursive=true), one page
    HEAD /{repo}/resolve/{rev}/{file}               X-Repo-Commit, ETag, Content-Length (no X-Xet-* headers, so
    GET  /{repo}/resolve/{rev}/{file}               huggingface_hub falls back to plain HTTP; Range supported)
Uploads (`create_repo`, `create_branch`, `upload_folder`):
    POST /api/repos/create                          {"name", "organization", "visibility", "type"}
    POST /api/models/{repo}/branch/{branch}
    POST /api/validate-yaml                         model card metadata check (always valid)
    POST /api/models/{repo}/preupload/{rev}         answers uploadMode "regular" for every file (no LFS, no Xet)
    POST /api/models/{repo}/commit/{rev}            NDJSON: header line, then base64 "file" lines
Also GET /api/whoami-v2 and GET /api/agent-harnesses (huggingface_hub's user-agent probe), answered trivially.

Every request is recorded in `FakeHub.requests`; requests to anything else get a 404 and land in
`FakeHub.unhandled`. Commits become real revisions, so what was pushed can be downloaded again.
`point_huggingface_hub_at(hub.endpoint, home, monkeypatch)` makes huggingface_hub (in this process and in
subprocesses) use the fake hub, with `home` as its home, cache and token folder.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

DEFAULT_USER = "fake-user"
_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".onnx", ".msgpack", ".h5")


def point_huggingface_hub_at(endpoint: str, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point huggingface_hub (this process and subprocesses) at `endpoint`, with `home` as HF home and cache.

    huggingface_hub reads these variables into `huggingface_hub.constants` when imported, and derives the
    resolve-URL template, the token path and the agent-registry path from them there, so both are set.
    """
    import huggingface_hub.constants as constants
    from huggingface_hub.utils import _detect_agent

    cache = home / "hub"
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_TOKEN_PATH", "HUGGINGFACE_CO_STAGING"):
        monkeypatch.delenv(name, raising=False)
    patches = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    for name, value in patches.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(_detect_agent, "_registry", {"standardEnvVars": [], "harnesses": {}})


def go_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a blob, as the Hub reports it for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass(frozen=True)
class Request:
    """One request the fake hub received."""

    method: str
    path: str  # unquoted, without the query string
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: bytes


@dataclass(frozen=True)
class CreatedRepo:
    """A POST /api/repos/create the fake hub received (`private` is None when no visibility was sent)."""

    repo_id: str
    private: bool | None
    payload: dict


@dataclass(frozen=True)
class ReceivedCommit:
    """A commit pushed to the fake hub."""

    repo_id: str
    revision: str
    summary: str
    files: dict[str, bytes]  # path -> content of the "file" (regular upload) lines
    lfs_files: list[dict]  # "lfsFile" lines (the fake hub never asks for LFS, so expected empty)
    deleted: list[str]


@dataclass
class FakeRepo:
    """A repository: commits (sha -> {path: content}) and refs (branch or tag -> sha)."""

    repo_id: str
    private: bool = False
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        """The commit sha of a branch, tag or (full) commit sha; None if unknown."""
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


class FakeHub:
    """A Hub-compatible HTTP server on 127.0.0.1 (random free port) in a background thread.

    Use as a context manager (or `start()` / `stop()`); `endpoint` is the URL to give `HF_ENDPOINT`.
    `write_error` (e.g. 403) makes every write (create, branch, preupload, commit) fail with that status.
    """

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[Request] = []
        self.unhandled: list[Request] = []
        self.created: list[CreatedRepo] = []
        self.commits: list[ReceivedCommit] = []
        self.write_error: int | None = None
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    # ------------------------------------------------------------------ content

    def add_commit(
        self, repo_id: str, files: dict[str, bytes], *, branch: str = "main", tags: tuple[str, ...] = ()
    ) -> str:
        """Commit `files` (the whole tree) to `branch` of `repo_id` (created if needed), tag it; returns its sha."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, FakeRepo(repo_id))
            sha = self._new_sha(repo_id)
            repo.commits[sha] = dict(files)
            for ref in (branch, *tags):
                repo.refs[ref] = sha
            return sha

    def _new_sha(self, repo_id: str) -> str:
        return hashlib.sha1(f"{repo_id}:{next(self._counter)}".encode()).hexdigest()

    # ------------------------------------------------------------------ queries for tests

    def downloaded(self, repo_id: str) -> set[str]:
        """Files of `repo_id` requested through /resolve/ (HEAD or GET)."""
        prefix = f"/{repo_id}/resolve/"
        return {r.path[len(prefix) :].split("/", 1)[1] for r in self.requests if r.path.startswith(prefix)}

    # ------------------------------------------------------------------ server lifecycle

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "the fake hub is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:  # end kept-alive connections, so their handler threads finish
            with _suppress_oserror():
                conn.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            if self._thread.is_alive():
                raise RuntimeError("the fake hub's server thread did not stop")
        self._server = None
        self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _suppress_oserror:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> bool:
        return exc_type is not None and issubclass(exc_type, OSError)


class _Handler(BaseHTTPRequestHandler):
    """Routes one request of the fake hub; `fake` is set on the subclass made by `FakeHub.start`."""

    fake: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects
    timeout = 10  # an idle kept-alive connection ends its thread after this

    def setup(self) -> None:
        super().setup()
        with self.fake._lock:
            self.fake._connections.add(self.connection)

    def finish(self) -> None:
        with self.fake._lock:
            self.fake._connections.discard(self.connection)
        with _suppress_oserror():
            super().finish()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        pass

    # ------------------------------------------------------------------ dispatch

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        request = Request(
            method=self.command,
            path=unquote(split.path),
            query=parse_qs(split.query),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
        )
        with self.fake._lock:
            self.fake.requests.append(request)
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        handled = self._route(request, segments)
        if not handled:
            with self.fake._lock:
                self.fake.unhandled.append(request)
            self._json(404, {"error": f"fake hub: no route for {request.method} {request.path}"})

    def _route(self, request: Request, seg: list[str]) -> bool:
        method = request.method
        if seg[:1] == ["api"]:
            rest = seg[1:]
            if method == "GET" and rest == ["whoami-v2"]:
                return self._whoami(request)
            if method == "GET" and rest == ["agent-harnesses"]:
                return self._json(200, {"standardEnvVars": [], "harnesses": {}})
            if method == "POST" and rest == ["repos", "create"]:
                return self._create_repo(request)
            if method == "POST" and rest == ["validate-yaml"]:
                return self._json(200, {"errors": [], "warnings": []})
            if len(rest) >= 3 and rest[0] == "models":
                repo_id, action, args = f"{rest[1]}/{rest[2]}", rest[3:4], rest[4:]
                if method == "GET" and action == []:
                    return self._repo_info(repo_id, "main")
                if method == "GET" and action == ["revision"] and args:
                    return self._repo_info(repo_id, "/".join(args))
                if method == "GET" and action == ["tree"] and args:
                    return self._tree(request, repo_id, args[0], "/".join(args[1:]))
                if method == "POST" and action == ["branch"] and args:
                    return self._create_branch(request, repo_id, "/".join(args))
                if method == "POST" and action == ["preupload"] and args:
                    return self._preupload(request, repo_id, "/".join(args))
                if method == "POST" and action == ["commit"] and args:
                    return self._commit(request, repo_id, "/".join(args))
            return False
        if method in ("GET", "HEAD") and len(seg) >= 5 and seg[2] == "resolve":
            return self._resolve(request, f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]))
        return False

    # ------------------------------------------------------------------ responses

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> bool:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        return True

    def _json(self, status: int, data: object, headers: dict[str, str] | None = None) -> bool:
        return self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> bool:
        extra = {"X-Error-Message": message, **(headers or {})}
        if code:
            extra["X-Error-Code"] = code
        return self._json(status, {"error": message}, extra)

    def _repo(self, repo_id: str) -> FakeRepo | None:
        with self.fake._lock:
            return self.fake.repos.get(repo_id)

    def _lookup(self, repo_id: str, revision: str) -> tuple[FakeRepo, str] | None:
        """The repo and commit sha, or None after answering 404 (RepoNotFound / RevisionNotFound)."""
        repo = self._repo(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        sha = repo.resolve(revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo, sha

    def _write_refused(self) -> bool:
        status = self.fake.write_error
        if status is None:
            return False
        self._error(status, None, "You don't have the rights to write to this namespace (fake hub)")
        return True

    # ------------------------------------------------------------------ downloads

    def _repo_info(self, repo_id: str, revision: str) -> bool:
        found = self._lookup(repo_id, revision)
        if found is None:
            return True
        repo, sha = found
        files = repo.commits[sha]
        return self._json(
            200,
            {
                "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0],
                "sha": sha,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "tags": [],
                "siblings": [{"rfilename": path} for path in sorted(files)],
            },
        )

    def _tree(self, request: Request, repo_id: str, revision: str, folder: str) -> bool:
        found = self._lookup(repo_id, revision)
        if found is None:
            return True
        repo, sha = found
        recursive = request.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        entries: dict[str, dict] = {}
        for path, content in sorted(repo.commits[sha].items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):  # parent folders
                if depth > 1 and not recursive:
                    break
                sub = prefix + "/".join(parts[:depth])
                entries[sub] = {"type": "directory", "path": sub, "oid": git_blob_sha1(sub.encode())}
            if len(parts) > 1 and not recursive:
                continue
            entry: dict = {"type": "file", "path": path, "size": len(content), "oid": git_blob_sha1(content)}
            if path.endswith(_LFS_SUFFIXES):
                entry["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}
            entries[path] = entry
        return self._json(200, [entries[key] for key in sorted(entries)])

    def _resolve(self, request: Request, repo_id: str, revision: str, filename: str) -> bool:
        found = self._lookup(repo_id, revision)
        if found is None:
            return True
        repo, sha = found
        content = repo.commits[sha].get(filename)
        if content is None:
            return self._error(404, "EntryNotFound", f"{filename} does not exist", {"X-Repo-Commit": sha})
        etag = hashlib.sha256(content).hexdigest() if filename.endswith(_LFS_SUFFIXES) else git_blob_sha1(content)
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": sha,
            "ETag": f'"{etag}"',
            "Accept-Ranges": "bytes",
        }
        status = 200
        range_header = request.headers.get("range", "")
        if request.method == "GET" and range_header.startswith("bytes="):
            start_text, _, end_text = range_header[len("bytes=") :].partition("-")
            start = int(start_text or 0)
            end = int(end_text) if end_text else len(content) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            content, status = content[start : end + 1], 206
        return self._send(status, content, headers)

    # ------------------------------------------------------------------ uploads

    def _authorized(self, request: Request) -> bool:
        """Writes need a bearer token; answer 401 otherwise."""
        if request.headers.get("authorization", "").startswith("Bearer "):
            return True
        self._error(401, None, "Invalid credentials in Authorization header")
        return False

    def _whoami(self, request: Request) -> bool:
        if not self._authorized(request):
            return True
        role = "read" if self.fake.write_error in (401, 403) else "write"
        return self._json(
            200,
            {
                "type": "user",
                "name": DEFAULT_USER,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"role": role}},
            },
        )

    def _create_repo(self, request: Request) -> bool:
        if not self._authorized(request) or self._write_refused():
            return True
        payload = json.loads(request.body or b"{}")
        repo_id = f"{payload.get('organization') or DEFAULT_USER}/{payload['name']}"
        visibility = payload.get("visibility")
        private = None if visibility is None else visibility == "private"
        if visibility is None and "private" in payload:  # older huggingface_hub sent a boolean
            private = bool(payload["private"])
        with self.fake._lock:
            self.fake.created.append(CreatedRepo(repo_id, private, payload))
            exists = repo_id in self.fake.repos
            if not exists:
                repo = self.fake.repos[repo_id] = FakeRepo(repo_id, private=bool(private))
                sha = self.fake._new_sha(repo_id)
                repo.commits[sha] = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
                repo.refs["main"] = sha
        url = f"{self.fake.endpoint}/{repo_id}"
        if exists:  # the real Hub's 409 also carries the url, which `create_repo(exist_ok=True)` reads
            message = "You already created this model repo"
            return self._json(409, {"error": message, "url": url}, {"X-Error-Message": message})
        return self._json(200, {"url": url, "name": repo_id, "id": hashlib.md5(repo_id.encode()).hexdigest()[:24]})

    def _create_branch(self, request: Request, repo_id: str, branch: str) -> bool:
        if not self._authorized(request) or self._write_refused():
            return True
        payload = json.loads(request.body or b"{}")
        found = self._lookup(repo_id, payload.get("startingPoint") or "main")
        if found is None:
            return True
        repo, sha = found
        with self.fake._lock:
            if branch in repo.refs:
                return self._error(409, None, "Reference already exists")
            repo.refs[branch] = sha
        return self._json(200, {})

    def _preupload(self, request: Request, repo_id: str, revision: str) -> bool:
        if not self._authorized(request) or self._write_refused():
            return True
        found = self._lookup(repo_id, revision)
        if found is None:
            return True
        repo, sha = found
        current = repo.commits[sha]
        files = json.loads(request.body)["files"]
        answer = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_sha1(current[f["path"]]) if f["path"] in current else None,
            }
            for f in files
        ]
        return self._json(200, {"files": answer, "commitOid": sha})

    def _commit(self, request: Request, repo_id: str, revision: str) -> bool:
        if not self._authorized(request) or self._write_refused():
            return True
        found = self._lookup(repo_id, revision)
        if found is None:
            return True
        repo, parent = found
        lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        files: dict[str, bytes] = {}
        lfs_files: list[dict] = []
        deleted: list[str] = []
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                assert value.get("encoding", "base64") == "base64", value
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                lfs_files.append(value)
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
        commit = ReceivedCommit(repo_id, revision, header.get("summary", ""), files, lfs_files, deleted)
        with self.fake._lock:
            self.fake.commits.append(commit)
        if lfs_files:
            return self._error(400, None, "fake hub: LFS uploads are not supported (preupload said regular)")
        with self.fake._lock:
            tree = {p: c for p, c in repo.commits[parent].items() if p not in deleted}
            tree.update(files)
            sha = self.fake._new_sha(repo_id)
            repo.commits[sha] = tree
            repo.refs[revision] = sha
        return self._json(
            200,
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self.fake.endpoint}/{repo_id}/commit/{sha}",
                "hookOutput": "",
                "pullRequestUrl": None,
            },
        )
