"""The image chain of the COCO protocol, applied alike to generated and real images (evaluation.md §0, §4).

uint8 image → center-crop to square (GigaGAN's CenterCropLongEdge) → PIL Lanczos to 256 (512 for the SDXL
protocol) → clean-fid `clean` mode: PIL bicubic on float32, one channel at a time, to 299 (no quantization).
Generated images stay in memory: a PNG round trip is lossless, so skipping it changes nothing.
"""

import numpy as np
from PIL import Image

FID_INPUT = 299  # TF-Inception's input side


def center_crop_square(image: np.ndarray) -> np.ndarray:
    """Return the centered square crop of a uint8 image [H, W, 3], side min(H, W), as torchvision rounds it."""
    from torchvision.transforms import functional

    pil = Image.fromarray(image)
    return np.asarray(functional.center_crop(pil, min(pil.size)))


def protocol_resize(image: np.ndarray, size: int | None) -> np.ndarray:
    """Return a uint8 image [H, W, 3] center-cropped and Lanczos-resized to [size, size, 3]; as is if size is None."""
    if size is None:
        return image
    pil = Image.fromarray(center_crop_square(image))
    return np.asarray(pil.resize((size, size), Image.LANCZOS))


def clean_resize(image: np.ndarray, size: int = FID_INPUT) -> np.ndarray:
    """Return clean-fid's `clean` resize of a uint8 image: float32 [size, size, 3] in [0, 255]."""
    from cleanfid.resize import make_resizer

    return make_resizer("PIL", False, "bicubic", (size, size))(image)


def gigagan_clip_roundtrip(image: np.ndarray) -> np.ndarray:
    """Return the uint8 image GigaGAN's CLIP score actually sees: its ToTensor → Normalize(0.5) → tensor2pil trip.

    tensor2pil truncates `(x + 1) · 127.5` to uint8 and the float32 trip lands just below the integer for 1..63,
    so those values drop by one. Reproduced with a lookup table built from the same float32 operations.
    """
    return _ROUNDTRIP[image]


def _roundtrip_table() -> np.ndarray:
    import torch

    u = torch.arange(256, dtype=torch.uint8)
    x = u.float().div(255)  # torchvision to_tensor on uint8
    x = x.sub(torch.tensor(0.5)).div(torch.tensor(0.5))  # Normalize([0.5]*3, [0.5]*3)
    return ((x + 1.0) * 127.5).clamp(0.0, 255.0).to(torch.uint8).numpy()  # GigaGAN tensor2pil


_ROUNDTRIP = _roundtrip_table()
