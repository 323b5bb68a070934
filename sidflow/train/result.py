"""What a training run returns, and how long it is: shared by the loop and the distill stage above it."""

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class DistillResult:
    model_uri: str
    kimg: float
    iterations: int
    interrupted: bool
    metrics: dict


def total_images(cfg) -> int:
    """Return the generator images a run of cfg trains on: kimg rounded up to whole iterations of cfg.batch."""
    return int(math.ceil(cfg.kimg * 1000 / cfg.batch)) * cfg.batch
