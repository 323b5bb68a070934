"""README drift: its first two commands; the parameter reference (docs/parameters.md) is generated from the configs."""

from pathlib import Path

from sidflow.config import markdown_table
from sidflow.evaluate.reference import RefStatsConfig
from sidflow.stages.distill import DistillConfig
from sidflow.stages.download_teacher import DownloadTeacherConfig
from sidflow.stages.evaluate import EvaluateConfig
from sidflow.stages.finetune import FinetuneConfig
from sidflow.stages.register import RegisterConfig
from sidflow.toy.train_teacher import ToyTeacherConfig

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_first_two_commands():
    commands = [line.split("#")[0].strip() for line in README.splitlines() if line.startswith("make ")]
    assert commands[:2] == ["make demo", "make test"]


def test_the_parameter_reference_is_generated_from_the_configs():
    from sidflow import paramdocs

    assert paramdocs.OUT.read_text() == paramdocs.render(), "docs/parameters.md is stale: run `make docs`"
    # every stage config is in it, and a required field says so instead of showing its empty default
    for cls in (DistillConfig, DownloadTeacherConfig, RegisterConfig, ToyTeacherConfig, EvaluateConfig, RefStatsConfig):
        assert markdown_table(cls) in paramdocs.render()
    assert markdown_table(FinetuneConfig, own=True) in paramdocs.render()
    assert "| `teacher` | required |" in markdown_table(DistillConfig)


