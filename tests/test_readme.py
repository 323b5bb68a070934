"""README drift: its first commands and parameter tables come from the code."""

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


def test_parameter_tables_match_the_configs():
    for cls in (DistillConfig, DownloadTeacherConfig, RegisterConfig, ToyTeacherConfig, EvaluateConfig, RefStatsConfig):
        assert markdown_table(cls) in README, f"README's {cls.__name__} table is stale: regenerate it"
    assert markdown_table(FinetuneConfig, own=True) in README, "README's FinetuneConfig table is stale: regenerate it"
