"""Per-teacher sizing presets: the GPUs, sharding, CPU and memory of a pipeline run's GPU tasks, chosen from the
teacher's type (SD1.5, SD2.1-base, SDXL) and overridden by any value the run gives explicitly.

A run parameter set to "auto" (the pipeline's default for these five) takes the preset of the teacher each task
distills; any other value wins for every teacher. The pipeline resolves them in a task of its own per teacher (it
needs the downloaded teacher's configs), and its outputs set the GPU tasks' accelerator count, CPU and memory:
docs/sizing.md.
"""

import json
from dataclasses import dataclass

from sidflow import storage

AUTO = "auto"
SIZED = ("gpus", "sharding", "distill_cpu", "distill_memory", "eval_gpus")  # the run parameters a preset can set


@dataclass(frozen=True)
class Preset:
    """One teacher type's sizing; CPU and memory are per GPU of the resolved `gpus`."""

    gpus: int  # distill/finetune GPUs (per node for a TrainJob)
    sharding: str  # ddp or fsdp (DistillConfig.sharding)
    cpu_per_gpu: int
    memory_g_per_gpu: int  # host memory: every process loads the teacher, the fake network and the generator
    eval_gpus: int


# Starting points, not measurements of every combination: benchmarks/results/scaling_fsdp_sd15.json (SD1.5, 8 H200s,
# 54 GiB peak per GPU) and scaling_sdxl_x4.json (SDXL needs fsdp: 50 GiB per GPU on 4, 64 GiB on 2, with gradient
# checkpointing, which stays a run parameter). SDXL's host memory is larger for its two text encoders and 2.6B UNet;
# its evaluation at 1024 px costs about 4x per image, hence more evaluation GPUs.
PRESETS = {
    "sd15": Preset(gpus=8, sharding="ddp", cpu_per_gpu=8, memory_g_per_gpu=64, eval_gpus=1),
    "sd21": Preset(gpus=8, sharding="ddp", cpu_per_gpu=8, memory_g_per_gpu=64, eval_gpus=1),
    "sdxl": Preset(gpus=8, sharding="fsdp", cpu_per_gpu=8, memory_g_per_gpu=96, eval_gpus=4),
}


def teacher_type(index: dict, unet: dict) -> str:
    """Return "sdxl", "sd21" or "sd15" from a teacher's model_index.json and unet/config.json."""
    from sidflow.teacher import _is_sdxl

    if _is_sdxl(index) or unet.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd21" if unet.get("cross_attention_dim") == 1024 else "sd15"  # SD2's OpenCLIP ViT-H text encoder


def read_type(teacher: str) -> str:
    """Return the type of the published teacher at URI `teacher` (reads its two JSON configs only)."""
    configs = [json.loads(storage.read_text(storage.join(teacher, *p))) for p in (("model_index.json",),
                                                                                ("unet", "config.json"))]
    return teacher_type(*configs)


def resolve(kind: str, gpus: str, sharding: str, distill_cpu: str, distill_memory: str, eval_gpus: str) -> dict:
    """Return the five sized values as strings (the form Kubernetes quantities take): each given value as is, each
    "auto" (or empty) from PRESETS[kind]; CPU and memory follow the resolved `gpus`."""
    p = PRESETS[kind]
    given = dict(gpus=gpus, sharding=sharding, distill_cpu=distill_cpu, distill_memory=distill_memory,
                 eval_gpus=eval_gpus)
    auto = {k for k, v in given.items() if v in (AUTO, "")}
    out = {k: v for k, v in given.items() if k not in auto}
    out.setdefault("gpus", str(p.gpus))
    out.setdefault("sharding", p.sharding)
    out.setdefault("eval_gpus", str(p.eval_gpus))
    n = int(out["gpus"]) if out["gpus"].isdigit() else p.gpus  # "all" (CLI only) keeps the preset's share
    out.setdefault("distill_cpu", str(p.cpu_per_gpu * n))
    out.setdefault("distill_memory", f"{p.memory_g_per_gpu * n}G")
    return {k: out[k] for k in SIZED}
