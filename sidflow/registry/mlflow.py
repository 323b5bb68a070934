"""The MLflow backend: `mlflow+http(s)://host:port` names an MLflow tracking server's Model Registry.

A version is an MLflow model version of registered model <name>: its source is the model URI, its description the
model card (cut at 5000 characters), its tags the record (`fid`, `clip` for the UI; `sidflow.metrics`,
`sidflow.teacher_fingerprint`, `sidflow.run_id`, `sidflow.created`, `sidflow.config`: JSON or text; a config over
5000 characters of JSON is left out). The champion is the MLflow alias `champion`.

Concurrency, through what the server makes atomic:
- Version numbers: the server's SqlAlchemyStore.create_model_version computes max(version) + 1 inside one
  transaction, and (name, version) is the primary key, so a concurrent insert of the same number fails and is
  retried by the server (mlflow/store/model_registry/sqlalchemy_store.py, mlflow 3.17.2). Two registrations get two
  numbers; and a visible version k implies that every k' < k was committed (k was max + 1 of committed rows).
- The alias is a plain upsert, no compare-and-swap. So the champion is decided on an append-only ledger: each
  promotion appends a model version to the registered model <name>.sidflow-promotions (its source models:/<name>/<v>,
  tagged with the challenger's metrics and its gate). The champion is the fold of the ledger in version order: an
  entry takes the crown if it is unconditional or `beats` the champion of the entries before it. The prefix before
  one's own entry never changes (numbering above), so each promoter learns for certain whether it was crowned.
- The `champion` alias mirrors the fold: every promoter sets it to the fold's champion, reads the ledger again and
  repeats until the ledger did not grow meanwhile; the last writer thus always writes the final champion, and a
  promoter that read a stale champion cannot leave it on the alias. Readers (`champion`) fold the ledger.
Credentials and TLS: MLflow's own variables, as its client reads them: MLFLOW_TRACKING_TOKEN (bearer) or
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (basic), MLFLOW_TRACKING_INSECURE_TLS,
MLFLOW_TRACKING_SERVER_CERT_PATH.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import time
import uuid
from datetime import datetime, timezone

from sidflow.registry import http
from sidflow.registry.rule import RegistryError, Version, beats

ALIAS, LEDGER = "champion", ".sidflow-promotions"
_TRIES = 1000  # each lost round means another promoter made progress; this only bounds a livelock
_TRANSIENT = (429, 500, 502, 503, 504)  # MLflow answers a lost insert race or a busy sqlite with a 5xx: retry
_PAGE = 1000
# A version's description is a String(5000) column (mlflow/store/model_registry/dbmodels/models.py), and servers
# whose schema predates the 2025-06 migration bda7b8c39065 store tag values as String(5000) too: longer text is cut
# (the card) or left out (the config).
_LIMIT = 5000


def _base(registry_uri: str) -> str:
    return registry_uri.split("+", 1)[1].rstrip("/") + "/api/2.0/mlflow"


def _headers() -> dict:
    if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def _context() -> ssl.SSLContext | None:
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return ssl._create_unverified_context()  # the user asked for it, as MLflow's client honours it
    if cert := os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
        return ssl.create_default_context(cafile=cert)
    return None


class _Transient(RegistryError):
    """A 5xx, 429 or no answer at all: the request may be tried again (a create may have landed)."""


def _call(registry_uri: str, method: str, path: str, body: dict | None = None, query: dict | None = None,
          ok_codes: tuple[str, ...] = (), retries: int = 5) -> dict:
    """One REST call; returns the body, or {"error_code": ...} for an error code in ok_codes; raises otherwise."""
    for attempt in range(retries + 1):
        try:
            status, out = http.call(method, _base(registry_uri) + path, body, _headers(), _context(), query)
        except RegistryError as exc:
            status, out = None, {"message": str(exc)}
        if status is not None and status < 300:
            return out
        if out.get("error_code") in ok_codes:
            return out
        if status is None or status in _TRANSIENT:
            if attempt < retries:
                time.sleep(0.2 * 2 ** attempt)
                continue
            raise _Transient(out["message"] if status is None else
                             f"{registry_uri}: {method} {path}: {status} {str(out.get('message', ''))[:300]}")
        if status in (401, 403):
            raise RegistryError(f"{registry_uri}: {status} credentials refused; set MLFLOW_TRACKING_TOKEN or "
                                "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD")
        raise RegistryError(f"{registry_uri}: {method} {path}: {status} {out.get('error_code', '')} "
                            f"{str(out.get('message', ''))[:300]}".rstrip())
    raise AssertionError("unreachable")


def _create_version(registry_uri: str, body: dict, token: str) -> dict:
    """Create a model version once: a create whose answer was lost (no answer, a 5xx) may have landed, so before
    trying again look for the version carrying `token`."""
    for attempt in range(6):
        try:
            return _call(registry_uri, "POST", "/model-versions/create", body, retries=0)["model_version"]
        except _Transient:
            mine = [mv for mv in _versions(registry_uri, body["name"]) if _tags(mv).get("sidflow.token") == token]
            if mine:
                return mine[0]
            if attempt == 5:
                raise
            time.sleep(0.2 * 2 ** attempt)
    raise AssertionError("unreachable")


def check(registry_uri: str) -> None:
    """Raise a one-line error unless the server answers the registry API with these credentials."""
    _call(registry_uri, "GET", "/registered-models/search", query={"max_results": 1}, retries=1)


def _ensure_model(registry_uri: str, name: str, description: str) -> None:
    _call(registry_uri, "POST", "/registered-models/create",
          {"name": name, "description": description, "tags": [{"key": "sidflow", "value": "true"}]},
          ok_codes=("RESOURCE_ALREADY_EXISTS",))


def _tags(mv: dict) -> dict:
    return {t["key"]: t.get("value", "") for t in mv.get("tags", [])}


def _record(mv: dict) -> Version:
    tags = _tags(mv)
    config = tags.get("sidflow.config")
    return Version(version=int(mv["version"]), model_uri=mv.get("source", ""),
                   metrics=json.loads(tags.get("sidflow.metrics", "{}")),
                   teacher_fingerprint=tags.get("sidflow.teacher_fingerprint", ""),
                   run_id=tags.get("sidflow.run_id", ""), created=tags.get("sidflow.created", ""),
                   model_card=mv.get("description", ""), config=json.loads(config) if config else None)


def _versions(registry_uri: str, name: str) -> list[dict]:
    out, token = [], None
    while True:
        page = _call(registry_uri, "GET", "/model-versions/search",
                     query={"filter": f"name='{name}'", "max_results": _PAGE, "page_token": token})
        out += page.get("model_versions", [])
        token = page.get("next_page_token")
        if not token:
            return sorted(out, key=lambda mv: int(mv["version"]))


# Reading ---------------------------------------------------------------------------------------------------------


def get(registry_uri: str, name: str, version: int) -> Version:
    """Return version `version` of model `name`."""
    out = _call(registry_uri, "GET", "/model-versions/get", query={"name": name, "version": str(version)},
                ok_codes=("RESOURCE_DOES_NOT_EXIST",))
    if "model_version" not in out:
        raise FileNotFoundError(f"{name} has no version {version} in {registry_uri}")
    return _record(out["model_version"])


def list_versions(registry_uri: str, name: str, reindex: bool = False) -> list[Version]:
    """Return every version of model `name`, oldest first (`reindex` has nothing to rebuild here)."""
    return [_record(mv) for mv in _versions(registry_uri, name)]


def _fold(entries: list[dict]) -> tuple[dict | None, set[int]]:
    """Return (the champion entry, the ledger numbers that took the crown) of ledger entries in version order."""
    held, crowned = None, set()
    for entry in entries:
        tags = _tags(entry)
        metrics = json.loads(tags["sidflow.metrics"])
        floor = float(tags["sidflow.clip_floor"]) if tags.get("sidflow.clip_floor") else None
        if tags.get("sidflow.require_better") != "true" or \
                beats(metrics, json.loads(_tags(held)["sidflow.metrics"]) if held else None, clip_floor=floor):
            held = entry
            crowned.add(int(entry["version"]))
    return held, crowned


def champion(registry_uri: str, name: str) -> Version | None:
    """Return the champion version of model `name` (the fold of its promotion ledger), or None."""
    held, _ = _fold(_versions(registry_uri, name + LEDGER))
    return get(registry_uri, name, int(_tags(held)["sidflow.version"])) if held else None


# Writing ---------------------------------------------------------------------------------------------------------


def register(registry_uri: str, name: str, model_uri: str, metrics: dict, teacher_fingerprint: str, run_id: str,
             model_card: str = "", config: dict | None = None) -> Version:
    """Create the next model version of `name` (the server numbers it) and return its record."""
    if "://" not in model_uri or model_uri.startswith("file://"):
        # The server refuses a local source that is not inside an MLflow run's artifacts (INVALID_PARAMETER_VALUE).
        raise ValueError(f"model={model_uri!r}: MLflow takes a remote model URI (s3://...) as a version's source, "
                         "not a local path")
    _ensure_model(registry_uri, name, "a generator distilled by sidflow; the champion alias is its promoted version")
    token = uuid.uuid4().hex  # finds our version again if a create's answer is lost (_create_version)
    config_json = json.dumps(config) if config is not None else None
    tags = {"sidflow.metrics": json.dumps(metrics), "sidflow.teacher_fingerprint": teacher_fingerprint,
            "sidflow.run_id": run_id, "sidflow.created": datetime.now(timezone.utc).isoformat(),
            "sidflow.token": token, **{k: repr(float(v)) for k, v in metrics.items() if k in ("fid", "clip")},
            **({"sidflow.config": config_json} if config_json and len(config_json) <= _LIMIT else {})}
    if len(tags["sidflow.metrics"]) > _LIMIT:
        raise ValueError(f"metrics: {len(tags['sidflow.metrics'])} characters of JSON; MLflow keeps {_LIMIT}")
    note = "\n\n[cut: the whole card is README.md of the model]"
    card = model_card if len(model_card) <= _LIMIT else model_card[:_LIMIT - len(note)] + note
    body = {"name": name, "source": model_uri, "description": card,
            "tags": [{"key": k, "value": v} for k, v in tags.items()]}
    return _record(_create_version(registry_uri, body, token))


# How SQLAlchemy's duplicate-row errors read through MLflow's 400 (sqlite, PostgreSQL, MySQL).
_DUPLICATE = ("IntegrityError", "UniqueViolation", "duplicate key", "Duplicate entry")


def _lost_insert(exc: RegistryError) -> bool:
    # MLflow's SQL store sets an alias by a lookup, then an insert when none exists: two promoters setting a model's
    # first alias at once can both insert, and the loser gets a 400 naming the IntegrityError (seen with the sqlite
    # store under concurrent promotions). The alias then exists, so setting it again is an update.
    return any(sign in str(exc) for sign in _DUPLICATE)


def _sync_alias(registry_uri: str, name: str) -> None:
    # Set the alias to the fold's champion until the ledger stops growing under us: the promoter that appended
    # last writes last, and writes the final champion (module docstring). A lost first insert goes round again.
    entries = _versions(registry_uri, name + LEDGER)
    for _ in range(_TRIES):
        held, _ = _fold(entries)
        if held is not None:
            try:
                _call(registry_uri, "POST", "/registered-models/alias",
                      {"name": name, "alias": ALIAS, "version": _tags(held)["sidflow.version"]})
            except RegistryError as exc:
                if not _lost_insert(exc):
                    raise
                entries = _versions(registry_uri, name + LEDGER)
                continue
        again = _versions(registry_uri, name + LEDGER)
        if len(again) == len(entries):
            return
        entries = again
    raise RegistryError(f"{registry_uri}: {name}'s promotion ledger kept growing; gave up after {_TRIES} rounds")


def promote(registry_uri: str, name: str, version: int, require_better: bool = False,
            clip_floor: float | None = None) -> bool:
    """Append a promotion of `version` to the ledger; True if it took the crown (module docstring)."""
    challenger = get(registry_uri, name, version)
    if require_better and not beats(challenger.metrics, None, clip_floor=clip_floor):
        return False  # below the CLIP floor: no champion could make it win, so the ledger need not hear of it
    ledger = name + LEDGER
    _ensure_model(registry_uri, ledger, f"sidflow's promotion ledger for {name}: one version per promotion; "
                                        f"the champion alias of {name} is the fold of these")
    tags = {"sidflow.version": str(version), "sidflow.metrics": json.dumps(challenger.metrics),
            "sidflow.require_better": "true" if require_better else "false",
            "sidflow.clip_floor": "" if clip_floor is None else repr(float(clip_floor)),
            "sidflow.promoted": datetime.now(timezone.utc).isoformat(), "sidflow.token": uuid.uuid4().hex}
    entry = _create_version(registry_uri, {"name": ledger, "source": f"models:/{name}/{version}",
                                           "tags": [{"key": k, "value": v} for k, v in tags.items()]},
                            tags["sidflow.token"])
    mine = int(entry["version"])
    _, crowned = _fold([e for e in _versions(registry_uri, ledger) if int(e["version"]) <= mine])
    _sync_alias(registry_uri, name)
    return mine in crowned
