"""KFP component `distill`: SiD distillation of a published teacher in this pod (sidflow.stages.distill).

Its parameters are DistillConfig's fields, generated from the dataclass (sidflow.kfp.declare), then the task's own
(sidflow.kfp.tasks.DistillTask); the body runs sidflow.kfp.tasks.distill.
"""

from kfp import dsl
from kfp.dsl import Metrics, Model, Output  # noqa: F401  (names in the generated signature)

from sidflow.kfp import declare, images
from sidflow.kfp.tasks import DistillTask
from sidflow.stages.distill import DistillConfig

BASE_IMAGE = images.TRAINER  # containers/trainer (sidflow/kfp/images.py)
OUTPUTS = [declare.Param("metrics", "Output[Metrics]", declare.REQUIRED, "the distill result's numeric metrics, kimg "
                                                                         "and iterations"),
           declare.Param("model", "Output[Model]", declare.REQUIRED, "the exported generator's model card; its "
                                                                     "metadata holds the model URI (weights stay in "
                                                                     "the artifact store)")]
PARAMS = declare.params(DistillConfig, skip=declare.none_fields(DistillConfig)) + declare.params(DistillTask)
SUMMARY = """Distill `teacher` into a generator under `output`; return the exported model's URI.

An empty output is <artifact_root>/runs/<run_id>/<teacher name>-<hash>. A run stopped by SIGTERM fails the task, so
that a retry resumes it."""

distill = dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)(declare.function("distill", declare.source(
    "distill", OUTPUTS + PARAMS, SUMMARY, "from sidflow.kfp import tasks\nreturn tasks.distill(**arguments)",
    returns="str"), globals()))
