"""KFP component `report`: the run's last task, run even when a teacher's tasks failed; one row per teacher."""

from kfp import dsl
from kfp.dsl import Markdown, Output

from sidflow.kfp import images

BASE_IMAGE = images.RUNTIME  # containers/runtime (sidflow/kfp/images.py)


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def report(summary: Output[Markdown], teachers: list = [], artifact_root: str = "", run_id: str = "",
           registry: str = "", model_name: str = "sid-generator") -> list:
    """Return, per teacher of this run, the last stage that completed (sidflow.kfp.report.teacher_status); record
    it as the teacher's attempt at its fingerprint (the next watch skips it unless retry_failed).

    Args:
        summary: the same as a Markdown table, shown in the run's UI.
        teachers: the watch task's list of new teachers ({"source", "dest", "fingerprint"}).
        artifact_root: artifact root URI the pipeline's runs go under.
        run_id: the pipeline run's id, passed as the whole value dsl.PIPELINE_JOB_ID_PLACEHOLDER.
        registry: registry root URI.
        model_name: registered model name.
    """
    from sidflow.kfp.report import markdown, record_attempts, teacher_status

    rows = [teacher_status(artifact_root, run_id, t, registry, model_name) for t in teachers]
    record_attempts(artifact_root, run_id, teachers, rows)
    with open(summary.path, "w") as f:
        f.write(markdown(rows))
    for r in rows:
        print(f"{r['status']:>16}  {r['source']}  {r['detail']}")
    return rows


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(report, "report.yaml")
