"""A Hugging Face Hub stand-in on 127.0.0.1: serves model repos from local directories over the
part of the Hub's HTTP API that huggingface_hub's `snapshot_download` uses, and records every
request (method, path, Authorization header) so tests can count downloads.

Routes (as huggingface.co answers them):
  GET  /api/models/{repo}[/revision/{rev}]   repo info: sha, siblings
  HEAD /{repo}/resolve/{rev}/{file}          X-Repo-Commit, ETag, Content-Length
  GET  /{repo}/resolve/{rev}/{file}          the file, at `bytes_per_s` when throttled
Unknown repos answer 401 with X-Error-Code RepoNotFound, unknown revisions 404 with
RevisionNotFound, unknown files 404 with EntryNotFound: huggingface_hub's error mapping.
"""

import hashlib
import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

CHUNK = 64 * 1024


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    authorization: str | None


class Repo:
    """One model repo: its files (name -> local path) and a commit sha derived from them."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self.etags = {name: _sha256(path) for name, path in files.items()}
        digest = hashlib.sha1()
        for name in sorted(files):
            digest.update(f"{name}:{self.etags[name]}".encode())
        self.sha = digest.hexdigest()  # 40 hex chars, like a git commit


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class LocalHub:
    """`with LocalHub({"org/name": {"file": path}}) as hub:` then HF_ENDPOINT=hub.url."""

    def __init__(self, repos: dict[str, dict[str, Path]], bytes_per_s: float | None = None):
        self.repos = {repo_id: Repo(files) for repo_id, files in repos.items()}
        self.bytes_per_s = bytes_per_s
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "LocalHub":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def file_gets(self) -> Counter[str]:
        """How many times each file was downloaded (GET on a resolve URL), by file name."""
        with self._lock:
            return Counter(
                r.path.split("/resolve/", 1)[1].split("/", 1)[1]
                for r in self.requests
                if r.method == "GET" and "/resolve/" in r.path
            )

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self._route(send_body=True)

            def do_HEAD(self) -> None:
                self._route(send_body=False)

            def _route(self, send_body: bool) -> None:
                path = unquote(urlparse(self.path).path)
                hub.record(Request(self.command, path, self.headers.get("Authorization")))
                info = re.fullmatch(r"/api/models/(.+?)(?:/revision/([^/]+))?", path)
                if info and self.command == "GET":
                    return self._repo_info(info[1], info[2] or "main")
                resolve = re.fullmatch(r"/(.+?)/resolve/([^/]+)/(.+)", path)
                if resolve:
                    return self._file(resolve[1], resolve[2], resolve[3], send_body)
                self._error(404, "EntryNotFound", "no such route")

            def _repo(self, repo_id: str, revision: str) -> Repo | None:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._error(401, "RepoNotFound", f"Repository Not Found for url: {repo_id}")
                    return None
                if revision not in ("main", repo.sha):
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                    return None
                return repo

            def _repo_info(self, repo_id: str, revision: str) -> None:
                repo = self._repo(repo_id, revision)
                if repo is None:
                    return
                siblings = [{"rfilename": name} for name in sorted(repo.files)]
                body = {"_id": repo.sha[:24], "id": repo_id, "modelId": repo_id,
                        "sha": repo.sha, "private": False, "gated": False,
                        "disabled": False, "tags": [], "siblings": siblings}  # fmt: skip
                data = json.dumps(body).encode()
                self._headers(200, {"Content-Type": "application/json",
                                    "Content-Length": str(len(data))})  # fmt: skip
                self.wfile.write(data)

            def _file(self, repo_id: str, revision: str, name: str, send_body: bool) -> None:
                repo = self._repo(repo_id, revision)
                if repo is None:
                    return
                if name not in repo.files:
                    return self._error(404, "EntryNotFound", f"{name} not in {repo_id}")
                path = repo.files[name]
                size = path.stat().st_size
                start = 0
                ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if ranged:  # huggingface_hub resumes an .incomplete file this way
                    start = int(ranged[1])
                self._headers(206 if ranged else 200, {
                    "X-Repo-Commit": repo.sha, "ETag": f'"{repo.etags[name]}"',
                    "Content-Length": str(size - start),
                    "Content-Type": "application/octet-stream",
                })  # fmt: skip
                if not send_body:
                    return
                with open(path, "rb") as f:
                    f.seek(start)
                    while chunk := f.read(CHUNK):
                        self.wfile.write(chunk)
                        if hub.bytes_per_s:
                            time.sleep(len(chunk) / hub.bytes_per_s)

            def _error(self, status: int, code: str, message: str) -> None:
                data = json.dumps({"error": message}).encode()
                self._headers(status, {"X-Error-Code": code, "X-Error-Message": message,
                                       "Content-Type": "application/json",
                                       "Content-Length": str(len(data))})  # fmt: skip
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _headers(self, status: int, headers: dict[str, str]) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()

        return Handler
