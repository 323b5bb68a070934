"""KFP component `register`: record an evaluated model as a registry version; promote it if it passes the gate.

Parameters generated from RegisterConfig (sidflow.kfp.declare); the body runs sidflow.kfp.tasks.register.
"""

from kfp import dsl

from sidflow.kfp import declare, images
from sidflow.kfp.components.evaluate import OVERRIDES
from sidflow.stages.register import RegisterConfig

BASE_IMAGE = images.RUNTIME  # containers/runtime (sidflow/kfp/images.py)

register = dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)(declare.function("register", declare.source(
    "register", declare.params(RegisterConfig, skip=declare.none_fields(RegisterConfig)) + [OVERRIDES],
    'Register the model and return {"version", "promoted", "champion_version"}.',
    "from sidflow.kfp import tasks\nreturn tasks.register(**arguments)", returns="dict"), globals()))
