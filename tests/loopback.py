"""HTTP servers on 127.0.0.1 for stand-ins of remote APIs: JSON ones (the KFP REST API, the Kubernetes API) and the
Hugging Face Hub (HubStub).

A JsonServer stand-in gives one function, route(method, path, query, body) -> (status, body); every request is recorded
as (method, path, query, body) in `requests` before it is routed.
"""

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse


class JsonServer:
    def __init__(self, route):
        self.requests = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                server.requests.append((self.command, url.path, parse_qs(url.query), body))
                status, answer = route(self.command, url.path, parse_qs(url.query), body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class HubStub:
    """A stand-in of the Hugging Face Hub on 127.0.0.1, reached through HF_ENDPOINT; repos live in memory.

    It answers what huggingface_hub 2.4 asks (read in its source):
    - GET /api/models/<repo>/revision/<rev>[?blobs=True]: HfApi.model_info (hf_api.py) builds ModelInfo from
      "id", "sha" and "siblings"; each sibling gives RepoSibling's "rfilename", "size", "blobId" and, for an LFS
      file, "lfs": {"size", "sha256", "pointerSize"} (BlobLfsInfo);
    - GET /api/models/<repo>/tree/<rev>: list_repo_tree, entries {"type": "file", "path", "size", "oid",
      "lfs": {"oid", "size", "pointerSize"}} (RepoFile), one page (no Link header);
    - HEAD and GET /<repo>/resolve/<rev>/<path>: file_download.get_hf_file_metadata reads X-Repo-Commit, X-Linked-Etag
      or ETag, and Content-Length; the GET streams the bytes.
    `*.safetensors` and `*.bin` are LFS files (sha256 of the bytes); the others carry their git blob id. `fail` set to
    an HTTP status makes every request answer it (a gated repo's 401, a rate limit's 429).
    """

    LFS = (".safetensors", ".bin")

    def __init__(self):
        self.repos: dict[str, dict[str, str]] = {}  # repo -> {ref or commit sha: commit sha}
        self.commits: dict[str, dict[str, bytes]] = {}  # commit sha -> {path: bytes}
        self.fail: int | None = None
        self.requests = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status, body: bytes, headers=(), head=False):
                self.send_response(status)
                for k, v in [("Content-Length", str(len(body))), *headers]:
                    self.send_header(k, v)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _handle(self, head=False):
                url = urlparse(self.path)
                stub.requests.append((self.command, url.path, parse_qs(url.query)))
                if stub.fail:
                    return self._send(stub.fail, json.dumps({"error": f"stub answers {stub.fail}"}).encode(),
                                      [("Content-Type", "application/json")], head)
                answer = stub.route(url.path)
                if answer is None:
                    return self._send(404, b'{"error": "Repository Not Found"}', [("X-Error-Code", "RepoNotFound")],
                                      head)
                body, headers = answer
                self._send(200, body, headers, head)

            def do_GET(self):
                self._handle()

            def do_HEAD(self):
                self._handle(head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def commit(self, repo: str, files: dict[str, bytes], ref: str = "main") -> str:
        """Make `files` the whole content of `repo` at `ref`; return the new commit's sha."""
        sha = hashlib.sha1(json.dumps([repo, len(self.commits), sorted(files)]).encode()).hexdigest()
        self.commits[sha] = dict(files)
        self.repos.setdefault(repo, {})[ref] = sha
        return sha

    def _entry(self, path: str, data: bytes) -> dict:
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id
        entry = {"path": path, "size": len(data), "oid": blob}
        if path.endswith(self.LFS):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _resolve(self, repo: str, rev: str) -> str | None:
        refs = self.repos.get(repo)
        if refs is None:
            return None
        return refs.get(rev) or (rev if rev in self.commits else None)

    def route(self, path: str):
        parts = unquote(path).strip("/").split("/")
        as_json = [("Content-Type", "application/json")]
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo, sha = "/".join(parts[2:4]), self._resolve("/".join(parts[2:4]), parts[5])
            if sha is None:
                return None
            entries = [self._entry(p, d) for p, d in sorted(self.commits[sha].items())]
            if parts[4] == "tree":
                return json.dumps([{"type": "file", **e} for e in entries]).encode(), as_json
            siblings = [{"rfilename": e["path"], "size": e["size"], "blobId": e["oid"],
                         **({"lfs": {"size": e["lfs"]["size"], "sha256": e["lfs"]["oid"], "pointerSize": 134}}
                            if "lfs" in e else {})} for e in entries]
            return json.dumps({"id": repo, "modelId": repo, "sha": sha, "siblings": siblings}).encode(), as_json
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, sha = "/".join(parts[:2]), self._resolve("/".join(parts[:2]), parts[3])
            data = self.commits.get(sha, {}).get("/".join(parts[4:])) if sha else None
            if data is None:
                return None
            entry = self._entry("/".join(parts[4:]), data)
            etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
            return data, [("X-Repo-Commit", sha), ("ETag", f'"{etag}"'), ("Content-Type", "application/octet-stream")]
        return None

    def close(self):
        self.server.shutdown()
        self.server.server_close()
