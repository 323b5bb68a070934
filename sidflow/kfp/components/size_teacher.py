"""KFP component `size_teacher`: the GPU tasks' sizing for one teacher, its type's preset where a run parameter is
"auto" (sidflow.sizing).

A task of its own because a preset depends on the teacher a loop iteration distills, which only a task knows: its
outputs set the GPU tasks' accelerator count, CPU and memory (the KFP driver resolves each from the task's inputs,
whichever task or parameter they come from, backend/src/v2/driver/resolve.go resolvePodSpecInputRuntimeParameter),
so they are strings, as the driver reads them.
"""

import dataclasses
from typing import NamedTuple  # noqa: F401  (a name in the generated signature)

from kfp import dsl

from sidflow import sizing
from sidflow.kfp import declare, images
from sidflow.stages.distill import DistillConfig
from sidflow.stages.evaluate import EvaluateConfig
from sidflow.trainjob import PlacementConfig

AUTO_HELP = "; auto = the teacher type's preset (docs/sizing.md)"


def _sized() -> list[declare.Param]:
    # The run parameters a preset sets, declared by their stage fields (evaluate's gpus is the run's eval_gpus), with
    # "auto" as their pipeline default and one of their choices.
    fields = {p.name: p for p in declare.params(DistillConfig) + declare.params(PlacementConfig)}
    fields["eval_gpus"] = {p.name: p for p in declare.params(EvaluateConfig)}["gpus"]
    # (PlacementConfig's CPU and memory say it themselves: a manifest by hand is sized by the same presets)
    return [dataclasses.replace(p, name=name, type=str, default=sizing.AUTO,
                                help=p.help if p.help.endswith(AUTO_HELP[2:]) else p.help + AUTO_HELP,
                                choices=p.choices and (*p.choices, sizing.AUTO))
            for name, p in ((name, fields[name]) for name in sizing.SIZED)]


SIZED = _sized()
TEACHER = declare.Param("teacher", str, declare.REQUIRED, "the downloaded teacher's URI")
OUTPUTS = ", ".join(f'("{name}", str)' for name in ("teacher_type", *sizing.SIZED))

size_teacher = dsl.component(base_image=images.RUNTIME, install_kfp_package=False)(declare.function(
    "size_teacher", declare.source(
        "size_teacher", [TEACHER, *SIZED],
        "Return the teacher's type and the sizing of its GPU tasks: each value as given, each \"auto\" from the "
        "type's preset.",
        "from sidflow.kfp import tasks\nreturn tasks.size_teacher(**arguments)",
        returns=f'NamedTuple("Outputs", [{OUTPUTS}])'), globals()))
