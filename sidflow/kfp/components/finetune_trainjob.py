"""KFP component `finetune_trainjob`: finetune on several nodes through a Kubeflow Trainer v2 TrainJob, as
`distill_trainjob` distills (sidflow.trainjob): a CPU task that creates the TrainJob, waits for it and hands on the
exported model. Its parameters are `finetune`'s and PlacementConfig's, generated from the dataclasses.
"""

from kfp import dsl
from kfp.dsl import Metrics, Model, Output  # noqa: F401  (names in the generated signature)

from sidflow.kfp import declare, images
from sidflow.kfp.components.distill import OUTPUTS
from sidflow.kfp.components.distill_trainjob import TRAINER_IMAGE
from sidflow.kfp.components.finetune import PARAMS
from sidflow.trainjob import PlacementConfig

BASE_IMAGE = images.RUNTIME
SUMMARY = """Fine-tune the generator of the distill run at `init` on `distill_nodes` nodes × `gpus` GPUs as a TrainJob;
return the exported model's URI.

A retried task adopts the TrainJob its previous attempt created (the name derives from `output`), or replaces it if it
failed; finetune resumes from its newest checkpoint either way."""

finetune_trainjob = dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)(declare.function(
    "finetune_trainjob", declare.source(
        "finetune_trainjob", OUTPUTS + [TRAINER_IMAGE] + declare.params(PlacementConfig) + PARAMS, SUMMARY,
        "from sidflow.kfp import tasks\nreturn tasks.finetune_trainjob(**arguments)", returns="str"), globals()))
