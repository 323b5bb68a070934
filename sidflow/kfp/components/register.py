"""KFP component `register`: record an evaluated model as a registry version; promote it if it passes the gate."""

from kfp import dsl

from sidflow.kfp import images

BASE_IMAGE = images.RUNTIME  # containers/runtime (sidflow/kfp/images.py)


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def register(registry: str = "", model_name: str = "sid-generator", model: str = "", metrics: str = "",
             teacher_fingerprint: str = "", run_id: str = "", clip_floor: float = -1.0,
             promote: str = "auto") -> dict:
    """Register the model and return {"version", "promoted", "champion_version"}.

    Args:
        registry: registry root URI (s3://bucket/prefix or a local path).
        model_name: registered model name: one path segment.
        model: URI of the published model directory (has manifest.json).
        metrics: URI of the evaluation metrics.json (at least 'fid', and 'clip').
        teacher_fingerprint: fingerprint of the distilled teacher; empty: the one in the model's sidflow.json.
        run_id: pipeline run id recorded with the version.
        clip_floor: minimum CLIP score a model needs to be promoted; negative: no floor.
        promote: auto (promote only if FID beats the champion's), always or never.
    """
    from sidflow.config import override
    from sidflow.stages import register as stage

    cfg = override(stage.RegisterConfig(), dict(
        registry=registry, model_name=model_name, model=model, metrics=metrics, teacher_fingerprint=teacher_fingerprint,
        run_id=run_id, clip_floor=None if clip_floor < 0 else clip_floor, promote=promote))
    result = stage.run(cfg)
    print(f"registered {model} as {model_name} v{result.version} (promoted={result.promoted})")
    return {"version": result.version, "promoted": result.promoted, "champion_version": result.champion_version}


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(register, "register.yaml")
