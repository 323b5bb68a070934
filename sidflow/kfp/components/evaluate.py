"""KFP components `evaluate` (FID and CLIP score of a model on a prompt set, sidflow.stages.evaluate) and
`passes_gate` (the registration gate); parameters generated from EvaluateConfig and tasks.Gate (sidflow.kfp.declare).
"""

from kfp import dsl
from kfp.dsl import HTML, Metrics, Output  # noqa: F401  (names in the generated signature)

from sidflow.kfp import declare, images
from sidflow.kfp.tasks import DistillTask, RunPlace
from sidflow.stages.evaluate import EvaluateConfig

BASE_IMAGE = images.TRAINER  # CUDA: generation, Inception, CLIP (sidflow/kfp/images.py)
RUNTIME_IMAGE = images.RUNTIME  # CPU
(OVERRIDES,) = [p for p in declare.params(DistillTask) if p.name == "overrides"]
TEACHER = declare.Param("teacher", str, "", "the distilled teacher's URI (names the run directory when output is "
                                            "empty)")
MODEL_NAME = declare.Param("model_name", str, "", "the registry's model name, heading the run page (samples)")
OUTPUTS = [declare.Param("metrics", "Output[Metrics]", declare.REQUIRED, "fid, clip, images and images/s"),
           declare.Param("samples", "Output[HTML]", declare.REQUIRED, "HTML page with the captioned sample grid")]
SUMMARY = """Evaluate `model` and return the URI of its metrics.json.

An empty output is eval/ of the run directory (<artifact_root>/runs/<run_id>/<teacher name>-<hash>)."""

evaluate = dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)(declare.function("evaluate", declare.source(
    "evaluate", OUTPUTS + declare.params(EvaluateConfig, skip=declare.none_fields(EvaluateConfig))
    + declare.params(RunPlace) + [TEACHER, OVERRIDES, MODEL_NAME], SUMMARY,
    "from sidflow.kfp import tasks\nreturn tasks.evaluate(**arguments)", returns="str"), globals()))

GATE_SUMMARY = """True when the evaluation's FID and score are finite and, if max_fid is set, the FID is at most it.

A task of its own because a condition must read a task's single output (kfp.local resolves no named output there)."""
METRICS = declare.Param("metrics", str, declare.REQUIRED, "URI of the evaluation's metrics.json")

passes_gate = dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)(declare.function(
    "passes_gate", declare.source("passes_gate", [METRICS, OVERRIDES], GATE_SUMMARY,
                                  "from sidflow.kfp import tasks\nreturn tasks.passes_gate(**arguments)",
                                  returns="bool"), globals()))
