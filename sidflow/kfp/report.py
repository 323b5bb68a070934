"""What became of each teacher of a pipeline run: the run's last task reads it back from storage and the registry.

A failed iteration of the ParallelFor leaves the run red with no word on which teacher failed where; this report
names, per teacher, the last stage that completed (no kfp import here: the component in components/report.py calls it),
and records it as the teacher's attempt at its fingerprint, which the next watch skips.
"""

import json

from sidflow import registry, storage
from sidflow.kfp.paths import run_output
from sidflow.train import checkpoint


def teacher_status(artifact_root: str, run_id: str, teacher: dict, registry_uri: str, model_name: str) -> dict:
    """Return {"source", "run", "status", "detail"}: status is registered, gated, evaluate-failed, finetune-failed,
    distill-failed or not-started, read from what the run published under its prefix and from the registry."""
    run = run_output(artifact_root, run_id, teacher["dest"])
    model = storage.join(run, "model")
    out = {"source": teacher["source"], "run": run}
    if storage.read_manifest(model) is None:
        last = checkpoint.latest(run)
        if last is None:
            return {**out, "status": "not-started", "detail": "no checkpoint: download or distill failed early"}
        info = checkpoint.run_info(last) or {}
        return {**out, "status": "distill-failed", "detail": f"stopped at {info.get('nimg', 0) / 1000:.3f} kimg"}
    tuned = storage.join(run, "finetune")  # written only when the run's finetune switch was on
    if storage.read_manifest(storage.join(tuned, "model")) is not None:
        model = storage.join(tuned, "model")  # the model evaluate and register took
    elif storage.exists(storage.join(tuned, "config.json")):
        last = checkpoint.latest(tuned)
        done = (checkpoint.run_info(last) or {}).get("nimg", 0) / 1000 if last else 0.0
        return {**out, "status": "finetune-failed", "detail": f"distilled; finetune stopped at {done:.3f} kimg"}
    versions = [v for v in registry.list_versions(registry_uri, model_name) if v.model_uri == model]
    if versions:
        held = registry.champion(registry_uri, model_name)
        crown = " (champion)" if held is not None and held.version == versions[-1].version else ""
        return {**out, "status": "registered", "detail": f"{model_name} v{versions[-1].version}{crown}"}
    metrics_uri = storage.join(run, "eval", "metrics.json")
    if storage.exists(metrics_uri):
        m = json.loads(storage.read_text(metrics_uri))
        return {**out, "status": "gated", "detail": f"not registered: fid={m.get('fid')}, clip={m.get('clip')}"}
    return {**out, "status": "evaluate-failed", "detail": "model exported, no metrics"}


def record_attempts(artifact_root: str, run_id: str, teachers: list[dict], rows: list[dict]) -> None:
    """Record each teacher's outcome under <artifact_root>/teacher-attempts/, so that the next watch skips a
    fingerprint this run tried (sidflow.stages.watch_teachers; its retry_failed tries it again)."""
    from sidflow.stages.watch_teachers import record_attempt

    for teacher, row in zip(teachers, rows):
        if teacher.get("fingerprint"):
            record_attempt(artifact_root, teacher, row["status"], row["detail"], run_id)


def markdown(rows: list[dict]) -> str:
    """Return the report as a Markdown table, one row per teacher."""
    lines = ["| teacher | status | detail | run |", "|---|---|---|---|"]
    lines += [f"| `{r['source']}` | {r['status']} | {r['detail']} | `{r['run']}` |" for r in rows]
    return "\n".join(lines) + "\n"
