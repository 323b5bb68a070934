"""Per-teacher sizing presets (sidflow.sizing): the type read from a teacher's configs, explicit values winning."""

import json
import shutil
from pathlib import Path

import pytest

from sidflow import sizing
from sidflow.kfp import tasks

AUTO = dict.fromkeys(sizing.SIZED, "auto")


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    from sidflow.toy.tiny import build_sd, tiny_sdxl_configs

    return build_sd(tmp_path_factory.mktemp("tiny-sdxl") / "teacher", tiny_sdxl_configs(), seed=0)


def _sd21_like(tiny_teacher, tmp_path) -> str:
    # SD2.1-base differs from SD1.5 in its text encoder (OpenCLIP ViT-H): the UNet cross-attends to 1024 wide states.
    path = Path(shutil.copytree(tiny_teacher, tmp_path / "sd21"))
    unet = json.loads((path / "unet" / "config.json").read_text())
    (path / "unet" / "config.json").write_text(json.dumps({**unet, "cross_attention_dim": 1024}))
    return str(path)


def test_teacher_types_are_read_from_the_configs(tiny_teacher, tiny_sdxl, tmp_path):
    assert sizing.read_type(tiny_teacher) == "sd15"
    assert sizing.read_type(tiny_sdxl) == "sdxl"
    assert sizing.read_type(_sd21_like(tiny_teacher, tmp_path)) == "sd21"


def test_auto_takes_each_types_preset(tiny_teacher, tiny_sdxl):
    sd15, sdxl = sizing.PRESETS["sd15"], sizing.PRESETS["sdxl"]
    assert tasks.size_teacher(tiny_teacher, **AUTO) == (
        "sd15", str(sd15.gpus), "ddp", str(sd15.cpu_per_gpu * sd15.gpus), f"{sd15.memory_g_per_gpu * sd15.gpus}G",
        str(sd15.eval_gpus))
    assert tasks.size_teacher(tiny_sdxl, **AUTO) == (
        "sdxl", str(sdxl.gpus), "fsdp", str(sdxl.cpu_per_gpu * sdxl.gpus), f"{sdxl.memory_g_per_gpu * sdxl.gpus}G",
        str(sdxl.eval_gpus))
    assert sdxl.sharding == "fsdp" and sdxl.memory_g_per_gpu > sd15.memory_g_per_gpu  # what makes SDXL fit


def test_explicit_values_win_and_cpu_memory_follow_the_resolved_gpus(tiny_sdxl):
    out = tasks.size_teacher(tiny_sdxl, **{**AUTO, "gpus": "2", "sharding": "ddp", "eval_gpus": "3"})
    p = sizing.PRESETS["sdxl"]
    assert out._asdict() == {"teacher_type": "sdxl", "gpus": "2", "sharding": "ddp",
                             "distill_cpu": str(2 * p.cpu_per_gpu), "distill_memory": f"{2 * p.memory_g_per_gpu}G",
                             "eval_gpus": "3"}
    given = dict(gpus="4", sharding="fsdp", distill_cpu="30", distill_memory="700Gi", eval_gpus="1")
    assert sizing.resolve("sd15", **given) == given  # nothing of the preset is left
    assert sizing.resolve("sd21", **{**given, "distill_memory": ""})["distill_memory"] == "256G"  # empty = auto


def test_every_preset_is_a_valid_run():
    import typing

    from sidflow.config import coerce
    from sidflow.stages.distill import DistillConfig

    for kind in sizing.PRESETS:
        sized = sizing.resolve(kind, **AUTO)
        assert coerce("sharding", typing.get_type_hints(DistillConfig)["sharding"], sized["sharding"])  # its Literal
        assert DistillConfig().batch % int(sized["gpus"]) == 0, kind  # the default batch splits over its GPUs
        assert sized["distill_memory"].endswith("G") and sized["distill_cpu"].isdigit()
