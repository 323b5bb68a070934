"""KFP component `distill_trainjob`: distill on several nodes through a Kubeflow Trainer v2 TrainJob (sidflow.trainjob).

The task itself runs on the CPU runtime image and only orchestrates: it creates the TrainJob (the trainer image on
`distill_nodes` nodes × `gpus` GPUs), polls it until it is Complete or Failed, then reads the exported model.
Its ServiceAccount needs create/get/delete on trainjobs.trainer.kubeflow.org (manifests/base/rbac-trainjobs.yaml).
Its parameters are those of `distill` and PlacementConfig's, generated from the dataclasses (sidflow.kfp.declare).
"""

from kfp import dsl
from kfp.dsl import Metrics, Model, Output  # noqa: F401  (names in the generated signature)

from sidflow.kfp import declare, images
from sidflow.kfp.components.distill import OUTPUTS, PARAMS
from sidflow.trainjob import PlacementConfig

BASE_IMAGE = images.RUNTIME  # containers/runtime (sidflow/kfp/images.py)
TRAINER_IMAGE = declare.Param("trainer_image", str, declare.REQUIRED, "image of the training pods (containers/trainer)")
SUMMARY = """Distill `teacher` on `distill_nodes` nodes × `gpus` GPUs as a TrainJob; return the exported model's URI.

`gpus` counts the GPUs of each node. A retried task adopts the TrainJob its previous attempt created (the name derives
from `output`), or replaces it if it failed; distill resumes from its newest checkpoint either way."""

distill_trainjob = dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)(declare.function(
    "distill_trainjob", declare.source(
        "distill_trainjob", OUTPUTS + [TRAINER_IMAGE] + declare.params(PlacementConfig) + PARAMS, SUMMARY,
        "from sidflow.kfp import tasks\nreturn tasks.distill_trainjob(**arguments)", returns="str"), globals()))
