"""A loopback stand-in for a Kubeflow Model Registry server: the REST endpoints sidflow calls, as specified by
api/openapi/model-registry.yaml of kubeflow/model-registry at tag v0.3.8 (commit cc86b769), base path
/api/model_registry/v1alpha3.

What it enforces, because the real server does and sidflow relies on it or could get it wrong:
- RegisteredModelCreate requires `name`, unique among registered models; ModelVersionCreate requires `name` and
  `registeredModelId`, the name unique within its registered model (the server stores "<model id>:<name>" under
  UNIQUE (type_id, name)); an artifact's name is unique within its version, a top-level one's among all artifacts
  of its type; `externalId` is unique in the whole database (UNIQUE (external_id)). A duplicate is 409 Conflict.
- Every custom property is a MetadataValue: an object whose `metadataType` names one of the six types and which
  carries that type's field with the spec's JSON type (`int_value` is an int64 *string*); anything else is 400.
- A name "a:b" is read back as "b" (internal/converter MapNameFromOwned, meant for "<parent id>:<name>").
- An artifact posted to a version carries the `artifactType` discriminator; PATCH replaces customProperties
  whole when given (and keeps them when absent, internal/core/model_version.go); errors are {"code", "message"}.
- With a token set, a request without `Authorization: Bearer <token>` is 401.
Ids are server-generated int64 strings; lists page with pageSize / nextPageToken.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BASE = "/api/model_registry/v1alpha3"
_FIELD = {"MetadataIntValue": ("int_value", str), "MetadataDoubleValue": ("double_value", (int, float)),
          "MetadataStringValue": ("string_value", str), "MetadataStructValue": ("struct_value", str),
          "MetadataProtoValue": ("proto_value", str), "MetadataBoolValue": ("bool_value", bool)}


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _check_props(props) -> None:
    if props is None:
        return
    if not isinstance(props, dict):
        raise Refused(400, "customProperties must be an object")
    for key, value in props.items():
        kind = value.get("metadataType") if isinstance(value, dict) else None
        if kind not in _FIELD:
            raise Refused(400, f"customProperties[{key}]: metadataType {kind!r} is not a MetadataValue type")
        field, tp = _FIELD[kind]
        v = value.get(field)
        if v is None or not isinstance(v, tp) or (tp is not bool and isinstance(v, bool)):
            raise Refused(400, f"customProperties[{key}]: {kind} needs {field} of the right type, got {v!r}")
        if kind == "MetadataIntValue":
            int(v)  # an int64 as a string


class Registry:
    """The server's state, behind one lock (the real server's database transaction)."""

    def __init__(self, token: str | None = None):
        self.token, self.lock, self.next_id = token, threading.Lock(), 1
        self.models, self.versions, self.artifacts = {}, {}, {}  # id -> entity
        self.external_ids: set[str] = set()
        self.requests: list[tuple[str, str]] = []

    def _new(self, body: dict, kind: str, unique_key: tuple, table: dict, uniques: set) -> dict:
        _check_props(body.get("customProperties"))
        if unique_key in uniques:
            raise Refused(409, f"{kind} with name {unique_key[-1]} already exists")
        ext = body.get("externalId")
        if ext is not None and ext in self.external_ids:
            raise Refused(409, f"{kind} with externalId {ext} already exists")
        now = str(int(time.time() * 1000))
        entity = {**body, "id": str(self.next_id), "createTimeSinceEpoch": now, "lastUpdateTimeSinceEpoch": now}
        entity.setdefault("customProperties", {})
        self.next_id += 1
        uniques.add(unique_key)
        if ext is not None:
            self.external_ids.add(ext)
        table[entity["id"]] = entity
        return entity

    # One method per endpoint: (status, body), or Refused.

    def create_model(self, body):
        if not body.get("name"):
            raise Refused(400, "RegisteredModelCreate: name is required")
        names = {("rm", m["name"]) for m in self.models.values()}
        return 201, self._new(body, "registered model", ("rm", body["name"]), self.models, names)

    def create_version(self, model_id, body):
        if model_id not in self.models:
            raise Refused(404, f"no registered model found for id {model_id}")
        if not body.get("name") or not body.get("registeredModelId"):
            raise Refused(400, "ModelVersionCreate: name and registeredModelId are required")
        names = {("mv", v["registeredModelId"], v["name"]) for v in self.versions.values()}
        body = {**body, "registeredModelId": model_id, "state": body.get("state", "LIVE")}
        return 201, self._new(body, "model version", ("mv", model_id, body["name"]), self.versions, names)

    def create_artifact(self, body, version_id=None):
        if body.get("artifactType") != "model-artifact":
            raise Refused(400, f"artifactType {body.get('artifactType')!r}: sidflow's stub takes model-artifact only")
        if version_id is not None and version_id not in self.versions:
            raise Refused(404, f"no model version found for id {version_id}")
        name = body.get("name") or f"generated-{self.next_id}"
        names = {("ma", a.get("_parent"), a["_stored"]) for a in self.artifacts.values()}
        # The server stores the name as given and reads "a:b" back as "b" (MapNameFromOwned).
        shown = name.split(":", 1)[1] if ":" in name else name
        return 201, self._new({**body, "name": shown, "_stored": name, "_parent": version_id}, "model artifact",
                              ("ma", version_id, name), self.artifacts, names)

    def patch_model(self, model_id, body):
        if model_id not in self.models:
            raise Refused(404, f"no registered model found for id {model_id}")
        if "name" in body:
            raise Refused(400, "RegisteredModelUpdate: name cannot be changed")
        _check_props(body.get("customProperties"))
        model = self.models[model_id]
        model.update(body)  # customProperties, when given, replace the old ones whole
        model["lastUpdateTimeSinceEpoch"] = str(int(time.time() * 1000))
        return 200, model


def _page(items: list[dict], query: dict) -> dict:
    size = int(query.get("pageSize", ["100"])[0])
    start = int(query.get("nextPageToken", ["0"])[0] or 0)
    chunk = items[start:start + size]
    token = str(start + size) if start + size < len(items) else ""
    return {"items": chunk, "nextPageToken": token, "pageSize": size, "size": len(chunk)}


def _public(entity: dict) -> dict:
    return {k: v for k, v in entity.items() if not k.startswith("_")}


def _find(table: dict, query: dict, parent_key: str | None) -> dict:
    name, ext = query.get("name", [None])[0], query.get("externalId", [None])[0]
    parent = query.get("parentResourceId", [None])[0]
    if name is None and ext is None:
        raise Refused(400, "supply name (with parentResourceId for an owned entity) or externalId")
    for entity in table.values():
        if ext is not None and entity.get("externalId") != ext:
            continue
        if name is not None and (entity.get("name") != name or (parent_key and entity.get(parent_key) != parent)):
            continue
        return entity
    raise Refused(404, f"no entity found for name={name}, parentResourceId={parent}, externalId={ext}")


class Handler(BaseHTTPRequestHandler):
    registry: Registry  # set per server by serve()

    def log_message(self, *args):  # quiet
        pass

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        reg = self.registry
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        reg.requests.append((method, url.path))
        try:
            if reg.token and self.headers.get("Authorization") != f"Bearer {reg.token}":
                raise Refused(401, "Unauthorized")
            if not url.path.startswith(BASE + "/"):
                raise Refused(404, f"no route {url.path}")
            parts = url.path[len(BASE) + 1:].split("/")
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            if method in ("POST", "PATCH") and not isinstance(body, dict):
                raise Refused(400, "request body must be a JSON object")
            with reg.lock:
                status, out = self._route(reg, method, parts, query, body)
            self._answer(status, out)
        except Refused as exc:
            self._answer(exc.status, {"code": {400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
                                               409: "Conflict"}.get(exc.status, str(exc.status)),
                                      "message": str(exc)})

    def _route(self, reg: Registry, method: str, parts: list[str], query: dict, body):
        match method, parts:
            case "GET", ["registered_models"]:
                return 200, _page([_public(m) for m in reg.models.values()], query)
            case "POST", ["registered_models"]:
                return reg.create_model(body)
            case "GET", ["registered_model"]:
                return 200, _public(_find(reg.models, query, None))
            case "GET", ["registered_models", model_id]:
                if model_id not in reg.models:
                    raise Refused(404, f"no registered model found for id {model_id}")
                return 200, _public(reg.models[model_id])
            case "PATCH", ["registered_models", model_id]:
                return reg.patch_model(model_id, body)
            case "GET", ["registered_models", model_id, "versions"]:
                if model_id not in reg.models:
                    raise Refused(404, f"no registered model found for id {model_id}")
                mine = [_public(v) for v in reg.versions.values() if v["registeredModelId"] == model_id]
                return 200, _page(sorted(mine, key=lambda v: int(v["id"])), query)
            case "POST", ["registered_models", model_id, "versions"]:
                return reg.create_version(model_id, body)
            case "GET", ["model_version"]:
                return 200, _public(_find(reg.versions, query, "registeredModelId"))
            case "POST", ["model_versions", version_id, "artifacts"]:
                return reg.create_artifact(body, version_id)
            case "GET", ["model_versions", version_id, "artifacts"]:
                mine = [_public(a) for a in reg.artifacts.values() if a.get("_parent") == version_id]
                return 200, _page(mine, query)
            case "POST", ["model_artifacts"]:
                return reg.create_artifact(body)
            case "GET", ["model_artifact"]:
                return 200, _public(_find(reg.artifacts, query, "_parent"))
        raise Refused(404 if method == "GET" else 405, f"{method} {'/'.join(parts)} is not served by this stub")

    def do_GET(self):  # noqa: N802 (http.server's names)
        self._handle("GET")

    def do_POST(self):  # noqa: N802
        self._handle("POST")

    def do_PATCH(self):  # noqa: N802
        self._handle("PATCH")


def serve(token: str | None = None) -> tuple[ThreadingHTTPServer, Registry]:
    """Start a stub server on a free loopback port in a thread; return (server, its state)."""
    registry = Registry(token)
    handler = type("BoundHandler", (Handler,), {"registry": registry})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, registry
