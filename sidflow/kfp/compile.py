"""Compile the sid-distill pipeline and its components to IR YAML, or run the pipeline here with kfp.local.

    python -m sidflow.kfp.compile            # sidflow/kfp/sid_distill.yaml, and pipeline/ + components/ in a checkout
    sidflow pipeline compile --out my.yaml [--max-parallel N] [--image-registry REG] [--runtime-digest sha256:…]

`pipeline/sid-distill.yaml` is the IR to upload in the Kubeflow UI; `components/<name>.yaml` is each component's spec,
which `kfp.components.load_component_from_file` loads into a team's own pipelines. tests/test_pipeline.py fails when
any of them is stale.
"""

import argparse
import tempfile
from pathlib import Path

DEFAULT_OUT = str(Path(__file__).with_name("sid_distill.yaml"))
LOCAL_SIZING = {"gpus": "1", "eval_gpus": "1"}  # run_local's defaults for the sizing parameters it cannot leave "auto"
REPO = Path(__file__).resolve().parent.parent.parent  # the checkout (absent from an installed wheel's layout)


def _components() -> dict:
    from sidflow.kfp.components.distill import distill
    from sidflow.kfp.components.distill_trainjob import distill_trainjob
    from sidflow.kfp.components.download_teacher import download_teacher
    from sidflow.kfp.components.evaluate import evaluate, passes_gate
    from sidflow.kfp.components.finetune import fine_tuned, finetune, keep_model
    from sidflow.kfp.components.finetune_trainjob import finetune_trainjob
    from sidflow.kfp.components.register import register
    from sidflow.kfp.components.report import report
    from sidflow.kfp.components.size_teacher import size_teacher
    from sidflow.kfp.components.watch_teachers import watch_teachers

    return {c.name: c for c in (watch_teachers, download_teacher, size_teacher, distill, distill_trainjob, finetune,
                                finetune_trainjob, fine_tuned, keep_model, evaluate, passes_gate, register, report)}


def add_literals(pipeline, choices: dict[str, tuple]) -> None:
    """Set each named run parameter's `literals` (its allowed values) in the pipeline's IR.

    The KFP 2.17 SDK cannot emit them (it refuses a `typing.Literal` annotation, reading it as an artifact type, so
    sidflow.kfp.declare declares the value type); the IR field is
    `ParameterSpec.literals` (pipeline_spec.proto). Backend 2.17 checks a run's values against it
    (apiserver/template/v2_template.go, common/util/validate_literal.go) and the run form shows a drop-down for it
    (frontend NewRunParametersV2.tsx).
    """
    from google.protobuf import json_format, struct_pb2

    parameters = pipeline.pipeline_spec.root.input_definitions.parameters
    for name, values in choices.items():
        del parameters[name].literals[:]  # in place, and the module's pipeline is compiled more than once
        parameters[name].literals.extend(json_format.ParseDict(v, struct_pb2.Value()) for v in values)


def _write(obj, path: str, **images) -> str:
    from kfp import compiler

    from sidflow.kfp.images import retarget

    with tempfile.TemporaryDirectory() as tmp:
        compiler.Compiler().compile(obj, package_path=str(Path(tmp) / "ir.yaml"))
        text = retarget((Path(tmp) / "ir.yaml").read_text(), **images)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    return path


def compile(path: str = DEFAULT_OUT, max_parallel: int | None = None, image_registry: str | None = None,
            runtime_digest: str | None = None, trainer_digest: str | None = None) -> str:
    """Compile the sid-distill pipeline to `path` (IR YAML: pipeline spec + kubernetes platform spec); return path.
    `max_parallel` bounds the teachers distilled at once (default sid_distill.MAX_PARALLEL); the image arguments put
    sidflow's images under another registry and pin them by digest (sidflow.kfp.images.retarget)."""
    from sidflow.kfp import sid_distill

    pipeline = sid_distill.build(max_parallel or sid_distill.MAX_PARALLEL)
    add_literals(pipeline, {p.name: p.choices for p in sid_distill.PARAMS if p.choices})
    try:
        _write(pipeline, path, registry=image_registry, runtime_digest=runtime_digest, trainer_digest=trainer_digest)
    finally:
        sid_distill.build()  # the module's pipeline keeps its defaults
    return path


def compile_repo(root: Path = REPO) -> list[str]:
    """Write the package's sid_distill.yaml, then (in a checkout: root has pyproject.toml) pipeline/sid-distill.yaml
    and components/<name>.yaml under root."""
    out = [compile(DEFAULT_OUT)]
    if not (root / "pyproject.toml").is_file():  # an installed wheel: only the package's own copy
        return out
    out.append(compile(str(root / "pipeline" / "sid-distill.yaml")))
    for name, component in _components().items():
        out.append(_write(component, str(root / "components" / f"{name.replace('_', '-')}.yaml")))
    return out


def run_local(pipeline_root: str, **arguments):
    """Run the whole pipeline here with kfp.local (SubprocessRunner in this interpreter; pod settings ignored)."""
    from kfp import local

    from sidflow.kfp.sid_distill import sid_distill

    unknown = sorted(set(arguments) - set(sid_distill.component_spec.inputs))
    if unknown:
        raise ValueError(f"unknown sid-distill parameter(s): {', '.join(unknown)}")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=pipeline_root, raise_on_error=True)
    # Here every task is a process of this machine, not a pod: one GPU process unless told otherwise, where a cluster
    # run takes the teacher type's preset (sidflow.sizing; an 8-GPU SD1.5 distill on a laptop would only fail).
    return sid_distill(**{**LOCAL_SIZING, **arguments})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    print("\n".join(compile_repo()))
