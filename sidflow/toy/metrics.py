"""The shapes evaluator (sidflow.toy.evaluator) as FID features and as per-image scorer, for the toy domain.

Its penultimate features give shapes-FID and its attribute heads give prompt accuracy (1 when all four predicted
attributes match the caption, else 0), so metrics.json carries `fid` and `clip` keys like a COCO evaluation and
the register stage's gate works unchanged. Images go in as generated (protocol `native`), scaled to [-1, 1].
"""

import numpy as np
import torch

from sidflow import storage
from sidflow.evaluate.clipscore import Scorer
from sidflow.evaluate.features import FeatureExtractor, as_float
from sidflow.evaluate.local import local_dir


def _load(uri: str, device):
    from pathlib import Path

    from sidflow.toy import evaluator

    path = local_dir(uri, "toy evaluator (evaluator.json + evaluator.pt, from `sidflow toy train-evaluator`)")
    if not (Path(path) / "evaluator.pt").is_file():
        raise FileNotFoundError(f"toy evaluator {uri} has no evaluator.pt (`sidflow toy train-evaluator` writes one)")
    return evaluator.load(path, device), "toy:sha256:" + storage.sha256_file(str(Path(path) / "evaluator.pt"))


def toy_features(uri: str, device) -> FeatureExtractor:
    """Return the shapes evaluator's penultimate features (shapes-FID) as a feature extractor."""
    model, fingerprint = _load(uri, device)
    return FeatureExtractor(fingerprint, as_float, lambda x: model.features(x / 127.5 - 1), torch.device(device))


def prepare_toy(image: np.ndarray) -> torch.Tensor:
    """Return a uint8 image [H, W, 3] as float [3, H, W] in [0, 255]."""
    return torch.from_numpy(image).permute(2, 0, 1).float()


def toy_scorer(uri: str, device) -> Scorer:
    """Return per-image prompt accuracy of the shapes evaluator (its mean is evaluator.prompt_accuracy)."""
    from sidflow.toy import evaluator

    model, fingerprint = _load(uri, device)

    def score(x: torch.Tensor, captions: list[str]) -> torch.Tensor:  # x [B, 3, H, W] in [0, 255]
        y, out = evaluator.labels(captions), model(x / 127.5 - 1)
        return torch.stack([out[k].argmax(1).cpu() == y[k] for k in evaluator.HEADS]).all(0).float()  # [B]

    return Scorer(fingerprint, prepare_toy, score, torch.device(device))


def toy_eval_set(root: str, evaluator_uri: str, n: int = 256, reference_images: int = 2048, seed: int = 12_345
                 ) -> dict[str, str]:
    """Write a shapes prompt set (n seen-combination captions, image i from seed i) and the reference statistics of
    fresh real renders under `root`; return {"prompts": URI, "reference": URI} for `sidflow evaluate`."""
    from sidflow.evaluate.protocol import write_prompt_set
    from sidflow.evaluate.reference import RefStatsConfig, compute_reference
    from sidflow.toy import shapes

    out = {"prompts": storage.join(root, "prompts.parquet"), "reference": storage.join(root, "reference.npz")}
    write_prompt_set(out["prompts"], shapes.sample(n, seed, "train")[1])
    real = storage.join(root, "real.parquet")
    shapes.write_parquet(real, reference_images, 777, "train")
    compute_reference(RefStatsConfig(images=real, out=out["reference"], protocol="native",
                                     features=f"toy:{evaluator_uri}", workers=0, device="cpu"),
                      toy_features(evaluator_uri, "cpu"))
    return out
