"""The embedded registry backend: numbered, immutable versions of a model under an S3 or path URI, and a
`champion` alias.

Layout (S3 by default; a local path works the same):

    <registry>/<name>/versions/000001/version.json   one record per version, written once, never changed
    <registry>/<name>/champion.json                  {"version", "metrics", "promoted"}: the model to serve
    <registry>/<name>/index.json                     a cache of all records, rebuilt from versions/ on register

Version numbers are claimed with a conditional create (S3 `If-None-Match: *`, a hard link locally): two runs that
register at once both try n = highest + 1, one wins, the other re-lists and tries the next number, so no record is
ever overwritten. The champion alias is replaced by compare-and-swap (S3 `If-Match: <ETag>`, a file lock locally),
so a promotion decided against a champion that changed meanwhile is re-decided against the new one.
The index is only a cache: readers check it against the listing of versions/ and read records it lacks.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone

from sidflow import storage
from sidflow.registry.rule import Version, beats, check_metrics, check_name, from_record

INDEX, CHAMPION, RECORD = "index.json", "champion.json", "version.json"
_TRIES = 1000  # each lost race means another writer made progress; this only bounds a livelock


def check(registry_uri: str) -> None:
    """Raise a one-line error unless the store honours conditional writes, which versions and the alias rely on."""
    storage.check_conditional_writes(registry_uri)


def _uri(registry_uri: str, name: str, *parts: str) -> str:
    check_name(name)
    return storage.join(registry_uri, name, *parts)


def _record_uri(registry_uri: str, name: str, version: int) -> str:
    return _uri(registry_uri, name, "versions", f"{version:06d}", RECORD)


def _parse(data: bytes | str, uri: str, what: str) -> dict:
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{uri}: {what} is not valid JSON ({exc})") from None


def _read_json(uri: str, what: str) -> dict:
    return _parse(storage.read_bytes(uri), uri, what)


def _listed(registry_uri: str, name: str) -> list[int]:
    """Version numbers present under versions/, ascending (a number may lack its record if its writer died)."""
    names = storage.listdir(_uri(registry_uri, name, "versions"))
    return sorted(int(n) for n in names if n.isdigit())


# Reading ---------------------------------------------------------------------------------------------------------


def get(registry_uri: str, name: str, version: int) -> Version:
    """Return version `version` of model `name`."""
    uri = _record_uri(registry_uri, name, int(version))
    try:
        return from_record(_read_json(uri, "version record"))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{name} has no version {version} in {registry_uri} ({exc})") from None


def _load_index(registry_uri: str, name: str) -> dict[int, dict]:
    uri = _uri(registry_uri, name, INDEX)
    if not storage.exists(uri):
        return {}
    try:
        return {int(r["version"]): r for r in json.loads(storage.read_text(uri))["versions"]}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ValueError(f"{uri} is corrupted (not a registry index); repair it with "
                         f"`sidflow registry reindex --registry {registry_uri} --name {name}`") from None


def _collect(registry_uri: str, name: str, cached: dict[int, dict]) -> list[Version]:
    # Records never change, so a cached record is good; the listing decides which versions exist.
    out = []
    for n in _listed(registry_uri, name):
        if n in cached:
            out.append(from_record(cached[n]))
            continue
        try:
            out.append(from_record(_read_json(_record_uri(registry_uri, name, n), "version record")))
        except FileNotFoundError:  # a number claimed by a writer that died before its record landed
            continue
    return out


def _write_index(registry_uri: str, name: str, versions: list[Version]) -> list[Version]:
    index = {"name": name, "versions": [v.to_dict() for v in versions],
             "updated": datetime.now(timezone.utc).isoformat()}
    storage.write_text(_uri(registry_uri, name, INDEX), json.dumps(index, indent=1))
    return versions


def list_versions(registry_uri: str, name: str, reindex: bool = False) -> list[Version]:
    """Return every version of model `name`, oldest first; `reindex` rebuilds index.json from versions/ first."""
    if reindex:
        return _write_index(registry_uri, name, _collect(registry_uri, name, {}))
    return _collect(registry_uri, name, _load_index(registry_uri, name))


def champion(registry_uri: str, name: str) -> Version | None:
    """Return the champion version of model `name`, or None if none was promoted yet."""
    uri = _uri(registry_uri, name, CHAMPION)
    if not storage.exists(uri):
        return None
    return get(registry_uri, name, _read_json(uri, "champion alias")["version"])


# Writing ---------------------------------------------------------------------------------------------------------


def register(registry_uri: str, name: str, model_uri: str, metrics: dict, teacher_fingerprint: str, run_id: str,
             model_card: str = "", config: dict | None = None) -> Version:
    """Record a new version of model `name` under the next free number and return it; never overwrites one."""
    check_metrics(metrics)
    check_name(name)
    storage.check_conditional_writes(registry_uri)  # without them, concurrent registrations overwrite each other
    token = uuid.uuid4().hex  # tells our own record from a rival's when a retried write answers "already exists"
    n = (_listed(registry_uri, name) or [0])[-1] + 1
    for _ in range(_TRIES):
        record = {"version": n, "model_uri": model_uri, "model_card": model_card, "metrics": dict(metrics),
                  "teacher_fingerprint": teacher_fingerprint, "run_id": run_id,
                  "created": datetime.now(timezone.utc).isoformat(), "config": config, "token": token}
        uri = _record_uri(registry_uri, name, n)
        # botocore retries a PUT whose answer was lost; the retry then sees our own record and says "exists".
        if storage.write_bytes_if_absent(uri, json.dumps(record, indent=1).encode()) or \
                _read_json(uri, "version record").get("token") == token:
            break
        n = max([n, *_listed(registry_uri, name)]) + 1  # lost the race for n: skip everything claimed meanwhile
    else:
        raise OSError(f"{_uri(registry_uri, name)}: no free version number after {_TRIES} tries")
    try:
        cached = _load_index(registry_uri, name)
    except ValueError:  # a corrupted cache is simply rebuilt whole
        cached = {}
    _write_index(registry_uri, name, _collect(registry_uri, name, cached))
    return from_record(record)


def promote(registry_uri: str, name: str, version: int, require_better: bool = False,
            clip_floor: float | None = None) -> bool:
    """Make `version` the champion (only if it `beats` the current one when require_better); True if it did."""
    challenger = get(registry_uri, name, version)
    uri = _uri(registry_uri, name, CHAMPION)
    storage.check_conditional_writes(registry_uri)  # the alias is replaced by compare-and-swap
    for _ in range(_TRIES):
        current = storage.read_bytes_tagged(uri)
        held = _parse(current[0], uri, "champion alias") if current else None
        if require_better and not beats(challenger.metrics, held["metrics"] if held else None, clip_floor=clip_floor):
            return False
        alias = {"version": challenger.version, "metrics": challenger.metrics,
                 "promoted": datetime.now(timezone.utc).isoformat()}
        # Compare-and-swap: if another promotion landed since the read, decide again against the new champion.
        if storage.write_bytes_if_match(uri, json.dumps(alias, indent=1).encode(), current[1] if current else None):
            return True
    raise OSError(f"{uri}: champion kept changing; gave up after {_TRIES} tries")
