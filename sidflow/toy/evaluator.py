"""The shapes domain evaluator: a small CNN that predicts every caption attribute of a 32×32 image.

Its penultimate features give a "shapes-FID" (Fréchet distance to real images) and its predictions give prompt
accuracy (the fraction of images whose four predicted attributes all match the caption): the toy stand-ins for
FID with Inception features and the CLIP score.
"""

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sidflow.evaluate.fid import feature_stats, frechet_distance
from sidflow.toy import shapes

HEADS = shapes.ATTRIBUTES


class ShapesClassifier(nn.Module):
    """conv ×4 → 128-d features → one linear head per attribute."""

    def __init__(self, width: int = 32, dim: int = 128):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.SiLU(), nn.Conv2d(4 * w, dim, 3, padding=1), nn.SiLU(),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(dim * 4, len(v)) for k, v in HEADS.items()})
        self.config = {"width": width, "dim": dim}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Return features [B, 4·dim] of images x [B, 3, 32, 32] in [-1, 1] (2×2 spatial pooling keeps position)."""
        return nn.functional.adaptive_avg_pool2d(self.body(x), 2).flatten(1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {k: head(f) for k, head in self.heads.items()}


def to_input(images: np.ndarray, device="cpu") -> torch.Tensor:
    """Return uint8 images [N, H, W, 3] as floats [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


def labels(captions: list[str]) -> dict[str, torch.Tensor]:
    """Return the attribute indices [N] of each caption, per head."""
    parsed = [shapes.parse(c) for c in captions]
    return {k: torch.tensor([v.index(p[k]) for p in parsed]) for k, v in HEADS.items()}


def train(steps: int = 3000, batch: int = 256, seed: int = 0, device="cpu", log=print) -> ShapesClassifier:
    """Train the classifier on freshly rendered real images of all combinations (held-out pairs included)."""
    torch.manual_seed(seed)
    model = ShapesClassifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for step in range(steps):
        images, captions = shapes.sample(batch, seed * 1_000_003 + step, split="all")
        y = labels(captions)
        out = model(to_input(images, device))
        loss = sum(nn.functional.cross_entropy(out[k], y[k].to(device)) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == steps - 1:
            log(f"evaluator step {step}: loss {loss.item():.4f}")
    return model.eval()


def save(model: ShapesClassifier, path: str | Path) -> None:
    """Write the classifier (weights + config) to a directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path / "evaluator.pt")
    (path / "evaluator.json").write_text(json.dumps({"class": "ShapesClassifier", **model.config}))


def load(path: str | Path, device="cpu") -> ShapesClassifier:
    """Read a classifier written by `save`."""
    path = Path(path)
    config = json.loads((path / "evaluator.json").read_text())
    model = ShapesClassifier(config["width"], config["dim"])
    model.load_state_dict(torch.load(path / "evaluator.pt", map_location="cpu", weights_only=True))
    return model.to(device).eval()


@torch.no_grad()
def features(model: ShapesClassifier, images: np.ndarray, batch: int = 1024) -> np.ndarray:
    """Return penultimate features [N, D] of uint8 images [N, 32, 32, 3]."""
    device = next(model.parameters()).device
    return np.concatenate([model.features(to_input(images[i : i + batch], device)).cpu().numpy()
                           for i in range(0, len(images), batch)])


@torch.no_grad()
def prompt_accuracy(model: ShapesClassifier, images: np.ndarray, captions: list[str], batch: int = 1024) -> float:
    """Return the fraction of images whose predicted attributes all match their caption."""
    device = next(model.parameters()).device
    y = labels(captions)
    correct = []
    for i in range(0, len(images), batch):
        out = model(to_input(images[i : i + batch], device))
        ok = torch.stack([out[k].argmax(1).cpu() == y[k][i : i + batch] for k in HEADS]).all(0)
        correct.append(ok)
    return float(torch.cat(correct).float().mean())


def shapes_fid(model: ShapesClassifier, images: np.ndarray, reference: np.ndarray) -> float:
    """Return the Fréchet distance between evaluator features of `images` and of `reference` images."""
    return frechet_distance(*feature_stats(features(model, images)), *feature_stats(features(model, reference)))
