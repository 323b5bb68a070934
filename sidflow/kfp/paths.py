"""Where a pipeline run writes: one prefix per run and per teacher, built inside the component from whole values.

The KFP backend's driver replaces `{{$.pipeline_job_uuid}}` only when a constant input *is* that placeholder
(backend/src/v2/driver/resolve.go, resolveInputParameter), and the launcher then substitutes only
`{{$.inputs.parameters[...]}}` (backend/src/v2/component/launcher_v2.go). A URI written as an f-string around the
placeholder therefore reaches the container with the placeholder still in it, so every run would share one prefix.
The pipeline passes the run id as its own input and the component joins the path here. This module imports no kfp.
"""

import hashlib

from sidflow import storage


def run_output(artifact_root: str, run_id: str, teacher: str) -> str:
    """Return `<artifact_root>/runs/<run_id>/<teacher name>-<8 hex of the teacher URI>`: distinct per run and per
    teacher, the same for every retry of one task (so a retry resumes its own checkpoints)."""
    if not artifact_root or not run_id or not teacher:
        raise ValueError(f"artifact_root={artifact_root!r}, run_id={run_id!r} and teacher={teacher!r} must all be set")
    if "{{" in run_id:
        raise ValueError(f"run_id={run_id!r} is an unresolved placeholder: pass dsl.PIPELINE_JOB_ID_PLACEHOLDER as the "
                         "whole value of an input, never inside a string")
    name = teacher.rstrip("/").rsplit("/", 1)[-1] or "teacher"
    return storage.join(artifact_root, "runs", run_id, f"{name}-{hashlib.sha256(teacher.encode()).hexdigest()[:8]}")
