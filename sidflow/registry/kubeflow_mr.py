"""The Kubeflow Model Registry backend: `kubeflow-mr+http(s)://host:port` names a Model Registry server.

REST API v1alpha3 (api/openapi/model-registry.yaml of kubeflow/model-registry, checked at v0.3.8). Model <name> is a
RegisteredModel; version n is its ModelVersion named "n", whose custom properties hold the record (`fid`, `clip`
as doubles; `model_uri`, `teacher_fingerprint`, `kfp_run_id`, `created`, `sidflow_metrics`, `sidflow_config` as
strings) and whose ModelArtifact has the model's URI, format "diffusers" and the KFP run as its source
(modelSourceKind "kfp", modelSourceClass "pipelinerun", modelSourceId the run id). The champion is shown on the
RegisteredModel as the custom property `champion` (a version name).

Concurrency, through what the server makes unique (a duplicate is 409 Conflict; the server's tables declare
UNIQUE (type_id, name) and UNIQUE (external_id), internal/datastore/embedmd/*/migrations/000001 and 000005):
- Version numbers: a ModelVersion name is unique within its RegisteredModel. A registration creates "n" with n the
  highest listed + 1; on 409 it lists again and tries the next free number, so no version is lost or overwritten.
- The champion: the API has no conditional update, so promotions claim epochs. Epoch e is a top-level ModelArtifact
  whose externalId `sidflow.champion.<model id>.<e>` is unique in the whole database; it names the version crowned
  at e. A promoter reads the newest epoch e (probing e+1, e+2, ... until 404), decides with `beats` against e's
  champion and creates epoch e+1; a 409 means another promotion landed first, so it reads again and decides anew:
  compare-and-swap on the epoch. Readers take the newest epoch.
- The `champion` property (and `sidflow_champion_epoch`, where probing starts) mirror the newest epoch: the winner
  writes them, reads the newest epoch again and repeats until it did not change, so the last writer writes the
  newest champion and a stale one never stays.
Credentials, as the official `model-registry` client finds them: a bearer token from MODEL_REGISTRY_TOKEN, else the
file named by KF_PIPELINES_SA_TOKEN_PATH, else the pod's service-account token; MODEL_REGISTRY_CA_CERT (a PEM path)
for a private CA.
"""

from __future__ import annotations

import json
import os
import ssl
from datetime import datetime, timezone
from pathlib import Path

from sidflow.registry import http
from sidflow.registry.rule import RegistryError, Version, beats

API = "/api/model_registry/v1alpha3"
SA_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # noqa: S105 (a path, not a secret)
_TRIES = 1000  # each lost round means another writer made progress; this only bounds a livelock
_PAGE = 100


def _base(registry_uri: str) -> str:
    return registry_uri.split("+", 1)[1].rstrip("/") + API


def _token() -> str | None:
    if token := os.environ.get("MODEL_REGISTRY_TOKEN"):
        return token
    path = os.environ.get("KF_PIPELINES_SA_TOKEN_PATH") or SA_TOKEN
    return Path(path).read_text().strip() if Path(path).is_file() else None


def _call(registry_uri: str, method: str, path: str, body: dict | None = None, query: dict | None = None,
          ok: tuple[int, ...] = ()) -> tuple[int, dict]:
    """One REST call; returns (status, body) for a 2xx or a status in `ok`, raises a one-line error otherwise."""
    token = _token()
    context = ssl.create_default_context(cafile=os.environ["MODEL_REGISTRY_CA_CERT"]) \
        if os.environ.get("MODEL_REGISTRY_CA_CERT") else None
    status, out = http.call(method, _base(registry_uri) + path, body,
                            {"Authorization": f"Bearer {token}"} if token else {}, context, query)
    if status < 300 or status in ok:
        return status, out
    if status in (401, 403):
        raise RegistryError(f"{registry_uri}: {status} credentials refused; set MODEL_REGISTRY_TOKEN (or run in a "
                            "pod whose service account the registry accepts)")
    raise RegistryError(f"{registry_uri}: {method} {path}: {status} {str(out.get('message', out))[:300]}")


def check(registry_uri: str) -> None:
    """Raise a one-line error unless the server answers the registry API with these credentials."""
    _call(registry_uri, "GET", "/registered_models", query={"pageSize": 1})


# Custom properties: the spec's MetadataValue, one object per value with its type named ------------------------


def _value(v) -> dict:
    if isinstance(v, bool):
        return {"metadataType": "MetadataBoolValue", "bool_value": v}
    if isinstance(v, int):
        return {"metadataType": "MetadataIntValue", "int_value": str(v)}  # int64 travels as a string
    if isinstance(v, float):
        return {"metadataType": "MetadataDoubleValue", "double_value": v}
    return {"metadataType": "MetadataStringValue", "string_value": str(v)}


def _props(values: dict) -> dict:
    return {k: _value(v) for k, v in values.items()}


def _read(props: dict, key: str, default=None):
    value = (props or {}).get(key)
    if not value:
        return default
    kind = value["metadataType"]
    if kind == "MetadataIntValue":
        return int(value["int_value"])
    return value.get({"MetadataDoubleValue": "double_value", "MetadataBoolValue": "bool_value"}.get(
        kind, "string_value"), default)


# Reading ---------------------------------------------------------------------------------------------------------


def _model(registry_uri: str, name: str, create: bool = False) -> dict | None:
    for _ in range(2):
        status, out = _call(registry_uri, "GET", "/registered_model", query={"name": name}, ok=(404,))
        if status == 200:
            return out
        if not create:
            return None
        status, out = _call(registry_uri, "POST", "/registered_models", {
            "name": name, "description": "a generator distilled by sidflow; custom property `champion` names its "
                                         "promoted version", "customProperties": _props({"sidflow": "true"})},
                            ok=(409,))
        if status == 201:
            return out
    raise RegistryError(f"{registry_uri}: registered model {name} could be neither created nor found")


def _version_items(registry_uri: str, model_id: str) -> list[dict]:
    out, token = [], None
    while True:
        _, page = _call(registry_uri, "GET", f"/registered_models/{model_id}/versions",
                        query={"pageSize": _PAGE, "orderBy": "ID", "sortOrder": "ASC", "nextPageToken": token})
        out += page.get("items") or []
        token = page.get("nextPageToken")
        if not token or not page.get("items"):
            return out


def _numbered(items: list[dict]) -> list[dict]:
    # sidflow names versions "1", "2", ...; a version named otherwise (added by hand) is not one of its records.
    return sorted((mv for mv in items if str(mv.get("name", "")).isdigit()), key=lambda mv: int(mv["name"]))


def _record(mv: dict) -> Version:
    p = mv.get("customProperties") or {}
    config = _read(p, "sidflow_config")
    return Version(version=int(mv["name"]), model_uri=_read(p, "model_uri", ""),
                   metrics=json.loads(_read(p, "sidflow_metrics", "{}")),
                   teacher_fingerprint=_read(p, "teacher_fingerprint", ""), run_id=_read(p, "kfp_run_id", ""),
                   created=_read(p, "created", ""), model_card=mv.get("description", ""),
                   config=json.loads(config) if config else None)


def get(registry_uri: str, name: str, version: int) -> Version:
    """Return version `version` of model `name`."""
    model = _model(registry_uri, name)
    status, mv = (404, {}) if model is None else _call(
        registry_uri, "GET", "/model_version", query={"name": str(version), "parentResourceId": model["id"]},
        ok=(404,))
    if status == 404:
        raise FileNotFoundError(f"{name} has no version {version} in {registry_uri}")
    return _record(mv)


def list_versions(registry_uri: str, name: str, reindex: bool = False) -> list[Version]:
    """Return every version of model `name`, oldest first (`reindex` has nothing to rebuild here)."""
    model = _model(registry_uri, name)
    return [] if model is None else [_record(mv) for mv in _numbered(_version_items(registry_uri, model["id"]))]


def _claim_id(model: dict, epoch: int) -> str:
    # No ':' in it: the server reads a name "a:b" back as "b" (MapNameFromOwned, internal/converter).
    return f"sidflow.champion.{model['id']}.{epoch:06d}"


def _head(registry_uri: str, model: dict, start: int | None = None) -> tuple[int, dict | None]:
    """Return (newest epoch, its claim artifact), probing upward from the epoch the model last showed."""
    epoch = _read(model.get("customProperties"), "sidflow_champion_epoch", 0) if start is None else start
    claim = None
    while True:
        status, out = _call(registry_uri, "GET", "/model_artifact", query={"externalId": _claim_id(model, epoch + 1)},
                            ok=(404,))
        if status == 404:
            break
        epoch, claim = epoch + 1, out
    if claim is None and epoch > 0:  # the newest epoch is the one the model showed: read its claim
        _, claim = _call(registry_uri, "GET", "/model_artifact", query={"externalId": _claim_id(model, epoch)})
    return epoch, claim


def champion(registry_uri: str, name: str) -> Version | None:
    """Return the champion version of model `name` (the newest epoch's claim), or None."""
    model = _model(registry_uri, name)
    if model is None:
        return None
    _, claim = _head(registry_uri, model)
    return get(registry_uri, name, _read(claim["customProperties"], "version")) if claim else None


# Writing ---------------------------------------------------------------------------------------------------------


def register(registry_uri: str, name: str, model_uri: str, metrics: dict, teacher_fingerprint: str, run_id: str,
             model_card: str = "", config: dict | None = None) -> Version:
    """Create ModelVersion "n" (the next free number) and its ModelArtifact; return the record."""
    model = _model(registry_uri, name, create=True)
    created = datetime.now(timezone.utc).isoformat()
    values = {"model_uri": model_uri, "teacher_fingerprint": teacher_fingerprint, "kfp_run_id": run_id,
              "created": created, "sidflow_metrics": json.dumps(metrics),
              **({"sidflow_config": json.dumps(config)} if config is not None else {}),
              **{k: float(v) for k, v in metrics.items() if k in ("fid", "clip")}}
    n = max([0, *(int(mv["name"]) for mv in _numbered(_version_items(registry_uri, model["id"])))]) + 1
    for _ in range(_TRIES):
        status, mv = _call(registry_uri, "POST", f"/registered_models/{model['id']}/versions", {
            "name": str(n), "registeredModelId": model["id"], "description": model_card, "author": "sidflow",
            "customProperties": _props(values)}, ok=(409,))
        if status != 409:
            break
        n = max([n, *(int(mv["name"]) for mv in _numbered(_version_items(registry_uri, model["id"])))]) + 1
    else:
        raise RegistryError(f"{registry_uri}: {name}: no free version number after {_TRIES} tries")
    # The artifact is what the dashboard and KServe deploy from; the record above already holds everything.
    _call(registry_uri, "POST", f"/model_versions/{mv['id']}/artifacts", {
        "artifactType": "model-artifact", "name": name, "uri": model_uri, "modelFormatName": "diffusers",
        "modelSourceKind": "kfp", "modelSourceClass": "pipelinerun", "modelSourceId": run_id,
        "modelSourceName": name, "state": "LIVE",
        "customProperties": _props({k: float(v) for k, v in metrics.items() if k in ("fid", "clip")})})
    return _record(mv)


def _show(registry_uri: str, model_id: str, name: str) -> None:
    # Mirror the newest epoch on the RegisteredModel until it stops moving under us (module docstring).
    model = _call(registry_uri, "GET", f"/registered_models/{model_id}")[1]
    epoch, claim = _head(registry_uri, model)
    for _ in range(_TRIES):
        props = dict(model.get("customProperties") or {})
        if claim is not None and _read(props, "sidflow_champion_epoch", 0) < epoch:
            props.update(_props({"champion": str(_read(claim["customProperties"], "version")),
                                 "sidflow_champion_epoch": epoch}))
            # PATCH replaces customProperties whole (the server keeps them only when the field is absent).
            _call(registry_uri, "PATCH", f"/registered_models/{model_id}", {"customProperties": props})
        again, claim = _head(registry_uri, model, start=epoch)
        if again == epoch:
            return
        epoch = again
        model = _call(registry_uri, "GET", f"/registered_models/{model_id}")[1]
    raise RegistryError(f"{registry_uri}: {name}'s champion kept changing; gave up after {_TRIES} rounds")


def promote(registry_uri: str, name: str, version: int, require_better: bool = False,
            clip_floor: float | None = None) -> bool:
    """Claim the next champion epoch for `version` (if it `beats` the newest one when require_better)."""
    challenger = get(registry_uri, name, version)
    model = _model(registry_uri, name)
    epoch, claim = _head(registry_uri, model)
    for _ in range(_TRIES):
        held = json.loads(_read(claim["customProperties"], "metrics")) if claim else None
        if require_better and not beats(challenger.metrics, held, clip_floor=clip_floor):
            return False
        status, _ = _call(registry_uri, "POST", "/model_artifacts", {
            "artifactType": "model-artifact", "name": _claim_id(model, epoch + 1),
            "externalId": _claim_id(model, epoch + 1), "uri": challenger.model_uri,
            "description": f"sidflow champion epoch {epoch + 1} of {name}: version {version}",
            "customProperties": _props({"version": version, "metrics": json.dumps(challenger.metrics),
                                        "promoted": datetime.now(timezone.utc).isoformat()})}, ok=(409,))
        if status != 409:
            _show(registry_uri, model["id"], name)
            return True
        epoch, claim = _head(registry_uri, model, start=epoch)  # lost epoch + 1: decide again against the newest
    raise RegistryError(f"{registry_uri}: {name}'s champion kept changing; gave up after {_TRIES} tries")
