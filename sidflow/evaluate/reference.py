"""Reference statistics: mu and sigma of the real images' features, computed once and stored at a URI.

`sidflow data ref-stats` reads every image of a folder, a .zip (COCO's val2014.zip) or a text-image parquet
(`image` column: the toy shapes data), applies the protocol's crop + Lanczos and the extractor's own input step in
DataLoader workers, and writes an .npz with `mu`, `sigma` and `meta` (JSON: protocol, features fingerprint, image
count, listing digest). clean-fid's make_custom_stats instead writes into site-packages, cannot apply the crop and
defaults to one worker (evaluation.md §2).
"""

import hashlib
import io
import json
import os
import re
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from sidflow import storage
from sidflow.config import param
from sidflow.evaluate.fid import feature_stats
from sidflow.evaluate.protocol import PROTOCOLS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True)
class RefStatsConfig:
    """Which real images, through which protocol and features, and where the statistics go."""

    images: str = param("", "real images URI: a folder (searched recursively), a .zip (e.g. COCO val2014.zip) or a "
                            "text-image .parquet with an 'image' column", required=True)
    out: str = param("", "URI of the .npz written (mu, sigma, meta); pass it to `sidflow evaluate --reference`",
                     required=True)
    protocol: Literal["coco30k", "sdxl10k", "native"] = param(
        "coco30k", "coco30k: crop + Lanczos 256; sdxl10k: 512; native: images as they are (toy)")
    features: str = param("inception", "'inception' (clean-fid TF-Inception from inception_weights) or "
                                       "'toy:<evaluator URI>'")
    inception_weights: str = param("", "URI (s3:// or local) of inception-2015-12-05.pt, clean-fid's TF-Inception")
    prompts: str | None = param(None, "prompt set with an image_id column: keep only those COCO images "
                                      "(the SDXL protocol's matching 10k); None: every image")
    workers: int = param(8, "DataLoader worker processes (decode, crop, Lanczos, bicubic)")
    batch: int = param(128, "images per feature batch")
    device: str | None = param(None, "torch device; None: cuda if available, else cpu")


def coco_image_id(name: str) -> int | None:
    """Return the COCO image id in a file name such as COCO_val2014_000000000042.jpg (None if it has none)."""
    match = re.search(r"(\d+)\.[A-Za-z]+$", name)
    return int(match.group(1)) if match else None


class _Images(torch.utils.data.Dataset):
    """Real images by name from a folder, a zip or parquet bytes, each prepared for the extractor."""

    def __init__(self, source: str, names: list[str], fid_size: int | None, prepare, blobs: list | None = None):
        self.source, self.names, self.fid_size, self.prepare, self.blobs = source, names, fid_size, prepare, blobs
        self._zip = None

    def __len__(self) -> int:
        return len(self.names)

    def _open(self, i: int):
        from PIL import Image

        if self.blobs is not None:
            return Image.open(io.BytesIO(self.blobs[i]))
        if self.source.endswith(".zip"):
            if self._zip is None:  # one handle per worker process
                self._zip = zipfile.ZipFile(self.source)
            return Image.open(io.BytesIO(self._zip.read(self.names[i])))
        return Image.open(Path(self.source, self.names[i]))

    def __getitem__(self, i: int) -> np.ndarray:
        from sidflow.evaluate.resize import protocol_resize

        image = np.asarray(self._open(i).convert("RGB"))  # COCO holds some greyscale JPEGs
        return self.prepare(protocol_resize(image, self.fid_size))


def _listing(cfg: RefStatsConfig) -> tuple[str, list[str], list | None]:
    """Return (local source, sorted image names, parquet blobs or None)."""
    from sidflow.evaluate.local import local_dir, local_file

    uri = cfg.images
    if uri.endswith(".parquet"):
        table = storage.parquet_table(storage.read_bytes(uri))
        if "image" not in table.column_names:
            raise ValueError(f"images={uri!r} has no 'image' column (columns: {table.column_names})")
        blobs = table.column("image").to_pylist()
        return uri, [f"{i:08d}" for i in range(len(blobs))], blobs
    if uri.endswith(".zip"):
        path = local_file(uri, "images")
        with zipfile.ZipFile(path) as z:
            names = sorted(n for n in z.namelist() if n.lower().endswith(IMAGE_SUFFIXES))
        return path, names, None
    path = local_dir(uri, "images")
    return path, [n for n in storage.list_files(path) if n.lower().endswith(IMAGE_SUFFIXES)], None


def compute_reference(cfg: RefStatsConfig, extractor) -> dict:
    """Compute mu/sigma of the real images with `extractor` (the FeatureExtractor cfg.features names, resolved by
    the caller: sidflow.stages.evaluate.load_features) and write them to cfg.out; return the metadata written."""
    from tqdm import tqdm

    from sidflow.evaluate.protocol import read_prompt_set

    for name in ("images", "out"):
        if not getattr(cfg, name):
            raise ValueError(f"{name} is empty: {RefStatsConfig.__dataclass_fields__[name].metadata['help']}")
    if not cfg.out.endswith(".npz"):
        raise ValueError(f"out={cfg.out!r} must end in .npz")
    source, names, blobs = _listing(cfg)
    if cfg.prompts:
        wanted = read_prompt_set(cfg.prompts).image_ids
        if wanted is None:
            raise ValueError(f"prompts={cfg.prompts!r} has no image_id column to select images by")
        by_id = {coco_image_id(Path(n).name): n for n in names}
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise ValueError(f"images={cfg.images!r} lacks {len(missing)} of the prompt set's images, "
                             f"e.g. id {missing[0]}")
        names = sorted(by_id[i] for i in set(wanted))
    if not names:
        raise ValueError(f"images={cfg.images!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    protocol = PROTOCOLS[cfg.protocol]
    data = _Images(source, names, protocol.fid_size, extractor.prepare, blobs)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch, num_workers=cfg.workers,
                                         collate_fn=np.stack, persistent_workers=False)
    bar = tqdm(loader, desc="ref-stats", unit="batch", disable=os.environ.get("SIDFLOW_NO_BAR") == "1")
    feats = [extractor(batch) for batch in bar]
    mu, sigma = feature_stats(np.concatenate(feats))
    meta = {"protocol": protocol.name, "fid_size": protocol.fid_size, "features": extractor.fingerprint,
            "images": len(names), "source": cfg.images, "prompts": cfg.prompts,
            "listing_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest(),
            "created": datetime.now(timezone.utc).isoformat()}
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, meta=np.str_(json.dumps(meta)))
    storage.write_bytes(cfg.out, buf.getvalue())
    return meta


@dataclass(frozen=True)
class Reference:
    """Stored reference statistics and what they were computed from."""

    mu: np.ndarray
    sigma: np.ndarray
    meta: dict
    fingerprint: str  # sha256 of the .npz bytes


def read_reference(uri: str) -> Reference:
    """Return the statistics at `uri`; a one-line FileNotFoundError says how to make them if absent."""
    if not uri or not storage.exists(uri):
        raise FileNotFoundError(f"reference={uri!r}: no statistics there; compute them once with `sidflow data "
                                "ref-stats --images <val2014 folder or zip> --out <uri>.npz`")
    data = storage.read_bytes(uri)
    not_ours = f"reference={uri!r} is not a `sidflow data ref-stats` .npz file"
    if not data.startswith(b"PK"):  # an .npz is a zip; anything else is refused here, never unpickled
        raise ValueError(not_ours)
    try:
        z = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile):
        raise ValueError(not_ours) from None
    if not {"mu", "sigma", "meta"} <= set(z.files):
        raise ValueError(f"reference={uri!r} is not a `sidflow data ref-stats` file (keys: {z.files})")
    return Reference(z["mu"], z["sigma"], json.loads(str(z["meta"])), "sha256:" + hashlib.sha256(data).hexdigest())
