"""KFP component `watch_teachers`: the teachers whose current version has no registered distillation yet.

Parameters generated from WatchTeachersConfig (sidflow.kfp.declare); the body runs sidflow.kfp.tasks.watch_teachers.
"""

from kfp import dsl

from sidflow.kfp import declare, images
from sidflow.stages.watch_teachers import WatchTeachersConfig

BASE_IMAGE = images.RUNTIME  # containers/runtime (sidflow/kfp/images.py)

watch_teachers = dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)(declare.function(
    "watch_teachers", declare.source(
        "watch_teachers", declare.params(WatchTeachersConfig),
        'Return one {"source", "dest", "fingerprint"} per new teacher, for a dsl.ParallelFor (failed sources logged).',
        "from sidflow.kfp import tasks\nreturn tasks.watch_teachers(**arguments)", returns="list"), globals()))
