"""README drift: its first two commands; the parameter reference (docs/parameters.md) is generated from the configs;
the relative links of README and docs/ resolve."""

import re
from pathlib import Path

from sidflow.config import markdown_table
from sidflow.evaluate.reference import RefStatsConfig
from sidflow.stages.distill import DistillConfig
from sidflow.stages.download_teacher import DownloadTeacherConfig
from sidflow.stages.evaluate import EvaluateConfig
from sidflow.stages.finetune import FinetuneConfig
from sidflow.stages.register import RegisterConfig
from sidflow.toy.train_teacher import ToyTeacherConfig

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


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


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file: lower case, punctuation dropped, spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in path.read_text().splitlines() if line.startswith("#")}


def test_relative_links_resolve():
    # README's links, and those of docs/ (benchmarks.md and evaluation.md hold what moved out of README), name files
    # and headings that exist; URLs (`https:`, `s3:`, ...) are not checked.
    broken = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = doc.parent / path if path else doc
            if not dest.exists() or (anchor and anchor not in _anchors(dest)):
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert broken == []


def test_the_throughput_table_is_rendered_from_the_result_files(tmp_path):
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("results_table", ROOT / "benchmarks" / "results_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    assert table.block(README) == table.render(), "README's throughput table is stale: run `make results-table`"
    profile = table.block((ROOT / "docs" / "benchmarks.md").read_text(), table.PROFILE_START, table.PROFILE_END)
    assert profile == table.render_profile(), "docs/benchmarks.md's profile table is stale: run `make results-table`"
    # the records before 3614f23 counted the step's own range as a kernel: left out, "other" is a few percent
    before = table.kernel_ms(table.run_of(json.loads((table.RESULTS / table.PROFILES[0][1]).read_text()),
                                          table.PROFILES[0][2])["torch_profile"])
    assert before["other"] < 0.05 * sum(before.values())
    # each figure comes from its file and run: a changed record changes the row
    file, name = table.ROWS[0][2], table.ROWS[0][3]
    record = json.loads((table.RESULTS / file).read_text())
    next(r for r in record["metrics"]["runs"] if r["run"] == name)["images_per_s_per_gpu"] = 99.5
    for _, _, f, _ in table.ROWS:
        (tmp_path / f).write_text((table.RESULTS / f).read_text())
    (tmp_path / file).write_text(json.dumps(record))
    assert "| 99.50 |" in table.render(tmp_path).splitlines()[2]
