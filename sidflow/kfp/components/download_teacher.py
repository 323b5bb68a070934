"""KFP component `download_teacher`: copy a teacher once into the artifact store, fingerprinted."""

from typing import NamedTuple

from kfp import dsl

from sidflow.kfp import images

BASE_IMAGE = images.RUNTIME  # containers/runtime (sidflow/kfp/images.py)


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def download_teacher(source: str = "", dest: str = "") -> NamedTuple(
        "Outputs", [("uri", str), ("fingerprint", str), ("skipped", bool)]):
    """Publish the teacher at `source` to `dest` (a no-op when `dest` holds the same fingerprint).

    Args:
        source: teacher to fetch: hf://org/name[@revision], s3://bucket/key or a local directory.
        dest: URI the teacher is published to (s3://... or a local path); a manifest is written last.
    """
    from collections import namedtuple

    from sidflow.stages import download_teacher as stage

    result = stage.run(stage.DownloadTeacherConfig(source=source, dest=dest))
    print(f"teacher {source} -> {result.uri} ({result.fingerprint}, skipped={result.skipped})")
    return namedtuple("Outputs", ["uri", "fingerprint", "skipped"])(result.uri, result.fingerprint, result.skipped)


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(download_teacher, "download_teacher.yaml")
