"""KFP component `watch_teachers`: the teachers whose current version has no registered distillation yet."""

from kfp import dsl

from sidflow.kfp import images

BASE_IMAGE = images.RUNTIME  # containers/runtime (sidflow/kfp/images.py)


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def watch_teachers(teachers: str = "", registry: str = "", model_name: str = "sid-generator",
                   artifact_root: str = "") -> list:
    """Return one {"source", "dest"[, "fingerprint"]} per new teacher, for a dsl.ParallelFor.

    Args:
        teachers: comma-separated teacher sources: hf://org/name@rev, s3://..., or local paths.
        registry: registry root URI (s3://bucket/prefix or a local path) holding <model_name>/.
        model_name: registered model name whose teacher fingerprints are skipped.
        artifact_root: artifact root URI; a new teacher is published to <artifact_root>/teachers/<slug>.
    """
    from sidflow.stages import watch_teachers as stage

    cfg = stage.WatchTeachersConfig(teachers=teachers, registry=registry, model_name=model_name,
                                    artifact_root=artifact_root)
    new = stage.run(cfg).new
    print(f"{len(new)} new teacher(s): {[t['source'] for t in new]}")
    # An unknown fingerprint (None) is dropped from the item: kfp.local cannot carry a null inside a loop item.
    return [{k: v for k, v in t.items() if v is not None} for t in new]


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(watch_teachers, "watch_teachers.yaml")
