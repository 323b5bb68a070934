"""KFP components `finetune` (few-step SiD with the adversarial term on real pairs, sidflow.stages.finetune) and
`keep_model` (the distilled model handed on unchanged when the pipeline's `finetune` is off).

`finetune`'s parameters are FinetuneConfig's fields, generated from the dataclass (sidflow.kfp.declare), then the
task's own (sidflow.kfp.tasks.DistillTask); it runs in one pod like `distill`.
"""

from kfp import dsl
from kfp.dsl import Metrics, Model, Output  # noqa: F401  (names in the generated signature)

from sidflow.kfp import declare, images
from sidflow.kfp.components.distill import OUTPUTS
from sidflow.kfp.tasks import DistillTask
from sidflow.stages.finetune import FinetuneConfig

BASE_IMAGE = images.TRAINER
PARAMS = declare.params(FinetuneConfig, skip=declare.none_fields(FinetuneConfig)) + declare.params(DistillTask)
SUMMARY = """Fine-tune the generator of the distill run at `init` on the real pairs at `data`; return the exported
model's URI.

An empty output is finetune/ of <artifact_root>/runs/<run_id>/<teacher name>-<hash>. A run stopped by SIGTERM fails
the task, so that a retry resumes it."""

finetune = dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)(declare.function(
    "finetune", declare.source("finetune", OUTPUTS + PARAMS, SUMMARY,
                               "from sidflow.kfp import tasks\nreturn tasks.finetune(**arguments)", returns="str"),
    globals()))

MODEL = declare.Param("model", str, declare.REQUIRED, "URI of the distilled generator")
keep_model = dsl.component(base_image=images.RUNTIME, install_kfp_package=False)(declare.function(
    "keep_model", declare.source("keep_model", [MODEL], "Return the distilled model's URI unchanged (finetune off).",
                                 "from sidflow.kfp import tasks\nreturn tasks.keep_model(**arguments)",
                                 returns="str"), globals()))
# The same no-op under its own name on the finetune side, so that neither is renumbered by the compiler.
TUNED_MODEL = declare.Param("model", str, declare.REQUIRED, "URI of the fine-tuned generator, from either branch")
fine_tuned = dsl.component(base_image=images.RUNTIME, install_kfp_package=False)(declare.function(
    "fine_tuned", declare.source("fine_tuned", [TUNED_MODEL], "Return the fine-tuned model's URI unchanged (a OneOf "
                                 "made a plain output).", "from sidflow.kfp import tasks\nreturn tasks.keep_model("
                                 "**arguments)", returns="str"), globals()))
