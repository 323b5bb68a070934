"""KFP component `download_teacher`: copy a teacher once into the artifact store, fingerprinted.

Parameters generated from DownloadTeacherConfig (sidflow.kfp.declare); the body runs tasks.download_teacher.
"""

from typing import NamedTuple  # noqa: F401  (a name in the generated signature)

from kfp import dsl

from sidflow.kfp import declare, images
from sidflow.stages.download_teacher import DownloadTeacherConfig

BASE_IMAGE = images.RUNTIME  # containers/runtime (sidflow/kfp/images.py)

download_teacher = dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)(declare.function(
    "download_teacher", declare.source(
        "download_teacher", declare.params(DownloadTeacherConfig),
        "Publish the teacher at `source` to `dest` (a no-op when `dest` holds the same fingerprint).",
        "from sidflow.kfp import tasks\nreturn tasks.download_teacher(**arguments)",
        returns='NamedTuple("Outputs", [("uri", str), ("fingerprint", str), ("skipped", bool)])'), globals()))
