"""docs/parameters.md: every stage's parameters, written from the config dataclasses that declare them.

`python -m sidflow.paramdocs` (or `make docs`) rewrites the file; a test fails when it is stale, so the tables are
never edited by hand and never disagree with `--help`.
"""

import sys
from pathlib import Path

from sidflow.config import markdown_table

OUT = Path(__file__).resolve().parent.parent / "docs" / "parameters.md"

HEAD = """# Parameters

Generated from the stage configs by `make docs` (`python -m sidflow.paramdocs`): do not edit by hand. Each parameter
is a `--flag-name` of its `sidflow` command (underscores become dashes; booleans take `true`/`false`) and a field of
the stage's config dataclass; the pipeline's run parameters are the same fields under the same names, except
evaluate's (`eval_` prefixed) and finetune's `steps`, `kimg`, `guidance`, `kappa` and `data` (`finetune_` prefixed).
A field that defaults to None, or an advanced setting the run form leaves out, has no pipeline parameter of its
own: it goes in the run's `overrides` dict (the last section lists both sets). In the pipeline, `gpus`,
`sharding`, `distill_cpu`, `distill_memory` and `eval_gpus` default to `auto` (the teacher type's preset,
`sizing.md`), and the six required URIs have no default.
"""


def sections() -> list[tuple[str, str, str]]:
    """Return (command, what it is, table) for each stage config, in the order a user meets them."""
    from sidflow.evaluate.reference import RefStatsConfig
    from sidflow.evaluate.weights import StageWeightsConfig
    from sidflow.stages.distill import DistillConfig
    from sidflow.stages.download_teacher import DownloadTeacherConfig
    from sidflow.stages.evaluate import EvaluateConfig
    from sidflow.stages.finetune import FinetuneConfig
    from sidflow.stages.register import RegisterConfig
    from sidflow.stages.watch_teachers import WatchTeachersConfig
    from sidflow.toy.train_teacher import ToyTeacherConfig
    from sidflow.trainjob import PlacementConfig

    return [
        ("sidflow watch-teachers", "which teachers have no registered distillation yet", markdown_table(
            WatchTeachersConfig)),
        ("sidflow download-teacher", "fetch, fingerprint and publish a teacher", markdown_table(DownloadTeacherConfig)),
        ("sidflow distill", "one-step or few-step SiD / SiD-LSG; defaults follow the official SD1.5 runs "
         "(method.md §5)", markdown_table(DistillConfig)),
        ("sidflow finetune", "every `sidflow distill` parameter, and these (its own)", markdown_table(
            FinetuneConfig, own=True)),
        ("sidflow distill-trainjob", "placement of a multi-node distill (a Kubeflow TrainJob), beside the distill "
         "parameters", markdown_table(PlacementConfig)),
        ("sidflow evaluate", "FID and CLIP score (or the toy domain's shapes-FID and prompt accuracy)",
         markdown_table(EvaluateConfig)),
        ("sidflow data ref-stats", "the reference statistics evaluate compares against", markdown_table(
            RefStatsConfig)),
        ("sidflow data stage-weights", "copy evaluate's weights to a URI once, for an air-gapped cluster",
         markdown_table(StageWeightsConfig)),
        ("sidflow registry register", "a new registry version, and its promotion", markdown_table(RegisterConfig)),
        ("sidflow toy train-teacher", "the toy domain's own teacher", markdown_table(ToyTeacherConfig)),
    ]


def run_form() -> str:
    """Return the section naming the pipeline's run parameters and the keys its `overrides` takes."""
    from sidflow.kfp import sid_distill

    def names(keys) -> str:
        return ", ".join(f"`{k}`" for k in keys)

    return ("## The pipeline's run form (`sid-distill`)\n\n"
            f"The {len(sid_distill.PARAMS)} run parameters, which the KFP UI's form lists alphabetically with name "
            f"and type: {names(sorted(p.name for p in sid_distill.PARAMS))}.\n\n"
            "The keys of `overrides` (a JSON object, e.g. `overrides='{\"norms\": \"autocast\", \"log_every\": "
            "10}'`; `sidflow pipeline submit`, `schedule` and `run-local` put a `KEY=VALUE` for one of them there "
            "themselves). Each names a field in the tables above, evaluate's under its pipeline name (`eval_batch` "
            "is evaluate's `batch`), and `max_fid` bounds the FID the registration gate lets through: "
            f"{names(sid_distill.OVERRIDABLE)}.\n")


def render() -> str:
    """Return the text of docs/parameters.md."""
    parts = [HEAD]
    for command, what, table in sections():
        parts.append(f"## `{command}`\n\n{what[0].upper() + what[1:]}.\n\n{table}\n")
    parts.append(run_form())
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    OUT.write_text(render())
    print(OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
