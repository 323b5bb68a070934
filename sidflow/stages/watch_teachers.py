"""Stage `watch_teachers`: list the teachers whose current version has no registered distillation yet.

Sources, comma-separated: `hf://org/name[@rev]`, an `s3://` or local teacher directory, or a folder of teachers
written `<folder>/*` (`s3://bucket/teachers/*`): each child directory of the folder holding a model_index.json is a
teacher, so a teacher uploaded there is picked up on the next tick.

A teacher's fingerprint is computed without downloading it, exactly as `download_teacher` will record it: sha256 over
the hub's (path, sha256) of the weight, config and tokenizer files for `hf://` sources (a README-only commit keeps
it), the stored fingerprint of a published directory, sha256 over the listing's (path, size, ETag) of an S3
directory without a manifest, or the content digest of a local directory. A teacher is skipped when its fingerprint
is registered for `model_name`, or when a pipeline run already tried it (distilled and gated, or failed: the run's
report task records each outcome under <artifact_root>/teacher-attempts/), unless `retry_failed` is set.

A source that cannot be read now (hub 401/404/429, an unreachable endpoint, access denied) is reported in
`failed` with a one-line reason and skipped; the other sources go on.
"""

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from sidflow import registry, storage
from sidflow.config import param
from sidflow.stages.download_teacher import hub_version, parse_hf
from sidflow.teacher import INFO_FILE, TeacherError, fingerprint, listing_fingerprint

FOLDER = "/*"  # a source ending so is a folder whose child directories are teachers
ATTEMPTS = "teacher-attempts"  # <artifact_root>/teacher-attempts/<slug>/<fingerprint hash>.json: a run's outcome


@dataclass(frozen=True)
class WatchTeachersConfig:
    teachers: str = param("", "comma-separated teacher sources: hf://org/name@rev, s3://... or local teacher "
                              "directories, or <folder>/* (s3://bucket/teachers/*) for every teacher directory in it",
                              required=True)
    registry: str = param("", "registry URI holding <model_name>: s3://bucket/prefix or a path, mlflow+http(s)://"
                              "host:port, kubeflow-mr+http(s)://host:port", required=True)
    model_name: str = param("sid-generator", "registered model name whose teacher fingerprints are skipped")
    artifact_root: str = param("", "artifact root URI; a new teacher is published to <artifact_root>/teachers/<slug>",
                               required=True)
    retry_failed: bool = param(False, "also return teachers whose current fingerprint a run already tried (failed, or "
                                      "missed the gate); off, such a teacher waits for a new version")


@dataclass(frozen=True)
class WatchTeachersResult:
    new: list[dict]  # {"source", "dest", "fingerprint"}
    failed: list[dict] = field(default_factory=list)  # {"source", "reason"}: one line, the source was skipped
    skipped: list[dict] = field(default_factory=list)  # {"source", "fingerprint", "reason"}: registered or tried


def sources(cfg: WatchTeachersConfig) -> list[str]:
    """Return the teacher sources of cfg.teachers, stripped, empty entries dropped."""
    return [s.strip() for s in cfg.teachers.split(",") if s.strip()]


def slug(source: str) -> str:
    """Return a one-segment name for a teacher source: `hf://org/name@rev` -> `org--name@rev`."""
    ref = re.sub(r"^[a-z0-9]+://", "", source.strip()).strip("/").replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._@-]+", "-", ref).strip("-") or "teacher"


def validate(cfg: WatchTeachersConfig) -> None:
    """Raise a one-line ValueError for a config that cannot work, before anything is read."""
    if not sources(cfg):
        raise ValueError("teachers is empty: give comma-separated hf://org/name@rev, s3://..., local paths or "
                         "<folder>/*")
    for name in ("registry", "artifact_root"):
        if not getattr(cfg, name):
            raise ValueError(f"{name} is empty: {WatchTeachersConfig.__dataclass_fields__[name].metadata['help']}")
    registry.check_name(cfg.model_name)
    for source in sources(cfg):
        path = source.removesuffix(FOLDER)
        if source.startswith("hf://"):
            parse_hf(source)
        elif "*" in path:
            raise ValueError(f"teachers: source={source!r} has a '*' that is not a final '/*' (a folder of teachers)")
        elif not storage.is_s3(path) and not Path(storage.local_path(path)).is_dir():
            raise ValueError(f"teachers: source={source!r} is not a directory, <folder>/*, hf://org/name[@rev] or "
                             "s3:// URI")


def current_fingerprint(source: str) -> str:
    """Return the fingerprint download_teacher will record for `source`, read without downloading the teacher."""
    if source.startswith("hf://"):
        return hub_version(source)[1]
    if storage.is_s3(source):
        published = fingerprint(source)
        if published is not None:
            return published
        rows = storage.list_stats(source)  # uploaded by hand (aws s3 sync): no manifest, the listing names it
        if not rows:
            raise FileNotFoundError(f"{source}: no files")
        return listing_fingerprint(rows)
    src = Path(storage.local_path(source))
    if (src / INFO_FILE).is_file():
        return json.loads((src / INFO_FILE).read_text())["fingerprint"]
    return "sha256:" + storage.manifest_digest(storage.build_manifest(str(src)))


def folder_teachers(folder: str) -> tuple[list[str], list[dict]]:
    """Return (teacher URIs, not-teachers) of the child directories of `folder`: a child is a teacher when it holds
    model_index.json; any other child is reported {"source", "reason"} (not a teacher, or still uploading)."""
    children = sorted({r["path"].split("/")[0] for r in storage.list_stats(folder) if "/" in r["path"]})
    teachers, others = [], []
    for child in children:
        uri = storage.join(folder, child)
        if storage.exists(storage.join(uri, "model_index.json")):
            teachers.append(uri)
        else:
            others.append({"source": uri, "reason": "no model_index.json: not a teacher (or still uploading)"})
    return teachers, others


def _source_errors() -> tuple:
    import httpx2  # huggingface_hub's HTTP client: a refused connection or a timeout is no OSError there

    # Hub HTTP errors (401, 404, 429, 5xx) are OSErrors (HfHubHTTPError), and so are sidflow.storage's S3 errors.
    return (OSError, TeacherError, httpx2.TransportError)


def _reason(err: Exception) -> str:
    status = getattr(getattr(err, "response", None), "status_code", None)
    lines = str(err).strip().splitlines()
    text = (lines[0] if lines else "")[:200]
    return f"{type(err).__name__}" + (f" (HTTP {status})" if status else "") + (f": {text}" if text else "")


def attempt_uri(artifact_root: str, dest: str, fp: str) -> str:
    """Return the URI of the record of a run's outcome for the teacher published to `dest` at fingerprint `fp`."""
    name = hashlib.sha256(fp.encode("utf-8")).hexdigest()[:16] + ".json"
    return storage.join(artifact_root, ATTEMPTS, dest.rstrip("/").rsplit("/", 1)[-1], name)


def record_attempt(artifact_root: str, teacher: dict, status: str, detail: str, run_id: str) -> str:
    """Write what a run made of `teacher` ({"source", "dest", "fingerprint"}); return the record's URI."""
    uri = attempt_uri(artifact_root, teacher["dest"], teacher["fingerprint"])
    storage.write_text(uri, json.dumps({"source": teacher["source"], "fingerprint": teacher["fingerprint"],
                                        "status": status, "detail": detail, "run_id": run_id,
                                        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
    return uri


def run(cfg: WatchTeachersConfig) -> WatchTeachersResult:
    """Return the teachers of cfg.teachers whose fingerprint is neither registered for cfg.model_name nor already
    tried by a run (unless cfg.retry_failed), and the sources that could not be read."""
    validate(cfg)
    errors = _source_errors()
    done = registry.fingerprints(cfg.registry, cfg.model_name)
    new, failed, skipped = [], [], []
    teachers = []
    for source in sources(cfg):
        if not source.endswith(FOLDER) or source.startswith("hf://"):
            teachers.append(source)
            continue
        try:
            found, others = folder_teachers(source.removesuffix(FOLDER))
        except errors as err:
            failed.append({"source": source, "reason": _reason(err)})
            continue
        teachers += found
        failed += others
    for source in dict.fromkeys(teachers):  # a teacher named twice (alone and in its folder) is one teacher
        try:
            fp = current_fingerprint(source)
        except errors as err:
            failed.append({"source": source, "reason": _reason(err)})
            continue
        dest = storage.join(cfg.artifact_root, "teachers", slug(source))
        tried = attempt_uri(cfg.artifact_root, dest, fp)
        if fp in done:
            skipped.append({"source": source, "fingerprint": fp, "reason": f"registered for {cfg.model_name}"})
        elif not cfg.retry_failed and storage.exists(tried):
            record = json.loads(storage.read_text(tried))
            skipped.append({"source": source, "fingerprint": fp, "reason": f"tried in run {record['run_id']}: "
                            f"{record['status']} ({record['detail']}); retry_failed=true tries it again"})
        else:
            new.append({"source": source, "dest": dest, "fingerprint": fp})
    return WatchTeachersResult(new, failed, skipped)


def summary(result: WatchTeachersResult) -> str:
    """Return the result as lines for a log: the new teachers, then each skipped or failed source and why."""
    lines = [f"{len(result.new)} new teacher(s): {[t['source'] for t in result.new]}"]
    lines += [f"skipped {s['source']}: {s['reason']}" for s in result.skipped]
    lines += [f"FAILED {f['source']}: {f['reason']}" for f in result.failed]
    return "\n".join(lines)
