"""FID feature extractors: clean-fid's TF-Inception loaded from a URI, or the toy shapes evaluator.

clean-fid hard-codes its Inception file to /tmp and downloads it on first use; here the TorchScript
`inception-2015-12-05.pt` comes from a URI (fetched once to a local cache) and is called the way clean-fid's
InceptionV3W calls it in `clean` mode: pool3 features of (x − 128) / 128 at 299×299. No DataParallel wrapping:
one process per GPU, sharded by the stage.
"""

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from sidflow import storage
from sidflow.evaluate.local import local_file
from sidflow.evaluate.resize import clean_resize

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"


def as_float(image: np.ndarray) -> np.ndarray:
    """Return a uint8 image [H, W, 3] as float32 values in [0, 255] (extractors that take images as they are)."""
    return image.astype(np.float32)


@dataclass
class FeatureExtractor:
    """A network from float images [B, 3, H, W] in [0, 255] to features [B, D], and the per-image step before it.

    `prepare` runs on the CPU, in threads or DataLoader workers (so it is a module-level function), on the
    protocol-resized uint8 image; `net` runs batched on `device`.
    """

    fingerprint: str  # recorded with reference statistics: real and fake features must come from the same network
    prepare: Callable[[np.ndarray], np.ndarray]
    net: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device

    @torch.no_grad()
    def __call__(self, prepared: np.ndarray) -> np.ndarray:
        """Return float32 features [B, D] of prepared images [B, H, W, 3]."""
        # NCHW-contiguous, as clean-fid's batches: the memory layout picks the convolution kernel, and so the last bits.
        x = torch.from_numpy(np.ascontiguousarray(prepared)).to(self.device).permute(0, 3, 1, 2).float().contiguous()
        return self.net(x).float().flatten(1).cpu().numpy()


def inception(weights_uri: str, device) -> FeatureExtractor:
    """Return clean-fid's TF-Inception (`clean` mode) loaded from the TorchScript file at `weights_uri`."""
    if not weights_uri:
        raise ValueError(f"inception_weights is empty: download {INCEPTION_FILE} ({INCEPTION_URL}) and pass its URI "
                         "(s3:// or a local path)")
    path = local_file(weights_uri, f"inception_weights: {INCEPTION_FILE} is missing; download it from "
                                   f"{INCEPTION_URL} and put it there")
    layers = torch.jit.load(path, map_location=device).eval().layers  # the torchscript's pool3 trunk

    def net(x: torch.Tensor) -> torch.Tensor:  # x [B, 3, 299, 299] in [0, 255]
        return layers((x - 128) / 128)  # [B, 2048], as InceptionV3W.forward with resize_inside=False

    return FeatureExtractor("inception:sha256:" + storage.sha256_file(path), clean_resize, net, torch.device(device))


def check_spec(spec: str) -> None:
    """Raise a one-line ValueError unless `spec` names FID features: 'inception' or 'toy:<evaluator URI>'."""
    if spec != "inception" and not spec.startswith("toy:"):
        raise ValueError(f"features={spec!r} is not 'inception' or 'toy:<evaluator URI>'")
