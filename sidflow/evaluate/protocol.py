"""The evaluation protocols and their prompt sets (evaluation.md §0, §4).

A prompt set is a parquet file with a `caption` column, an optional `seed` column (default: the row index, so
image i uses seed i, as SiD-LSG's `--seeds=0-29999`) and an optional `image_id` (the COCO image the caption
belongs to: the SDXL protocol compares with exactly those real images). `sidflow data coco-prompts` builds one
from GigaGAN's 30,000-line `captions.txt` (md5 checked) or from COCO's `captions_val2014.json`.
"""

import hashlib
import io
import json
import random
from dataclasses import dataclass

from sidflow import storage


@dataclass(frozen=True)
class Protocol:
    """How images are brought to the feature extractor and the scorer; the same chain for real and fake."""

    name: str
    fid_size: int | None  # center-crop to square, then Lanczos to this side (None: images as they are)
    clip_size: int | None  # the image the CLIP scorer sees: GigaGAN's compute_clip_score always uses 256
    about: str


PROTOCOLS = {
    "coco30k": Protocol("coco30k", 256, 256, "zero-shot COCO-2014 30k (GigaGAN, DMD2, SiD-LSG): 256 px, "
                                           "clean-FID vs all 40,504 val2014 images"),
    "sdxl10k": Protocol("sdxl10k", 512, 256, "DMD2's SDXL protocol: 10k val2014 prompts, FID at 512 px against "
                                           "the 10k matching real images, CLIP at 256 px"),
    "native": Protocol("native", None, None, "images as generated, no crop or resize (toy shapes domain)"),
}

# GigaGAN's COCO-2014 caption list; byte-identical copies ship with SiD-LSG and DMD2 (evaluation.md §0).
CAPTIONS_TXT_MD5 = "20ed79e6a73d7b8fdbfb6ebc8c5c7e99"
CAPTIONS_TXT_LINES = 30_000


@dataclass(frozen=True)
class PromptSet:
    """Captions with their seeds (and COCO image ids where known), in evaluation order."""

    captions: list[str]
    seeds: list[int]
    image_ids: list[int] | None
    fingerprint: str  # sha256 of the parquet bytes

    def __len__(self) -> int:
        return len(self.captions)


def read_prompt_set(uri: str) -> PromptSet:
    """Return the prompt set stored at `uri`; raise a one-line ValueError if it is not one."""
    if not uri.endswith(".parquet"):
        raise ValueError(f"prompts={uri!r} must be a .parquet prompt set (columns caption, seed, image_id); "
                         "build one with `sidflow data coco-prompts`")
    data = storage.read_bytes(uri)
    table = storage.parquet_table(data)
    if "caption" not in table.column_names:
        raise ValueError(f"prompts={uri!r} has no 'caption' column (columns: {table.column_names}); "
                         "build one with `sidflow data coco-prompts`")
    captions = table.column("caption").to_pylist()
    if not captions:
        raise ValueError(f"prompts={uri!r} holds no captions")
    if any(c is None for c in captions):
        raise ValueError(f"prompts={uri!r}: caption of row {captions.index(None)} is null")
    seeds = table.column("seed").to_pylist() if "seed" in table.column_names else list(range(len(captions)))
    ids = table.column("image_id").to_pylist() if "image_id" in table.column_names else None
    return PromptSet([str(c) for c in captions], [int(s) for s in seeds], ids,
                     "sha256:" + hashlib.sha256(data).hexdigest())


def write_prompt_set(uri: str, captions: list[str], seeds: list[int] | None = None,
                     image_ids: list[int] | None = None) -> None:
    """Write a prompt set parquet; seeds default to the row index (image i uses seed i)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"caption": pa.array(captions, pa.string()),
               "seed": pa.array(seeds if seeds is not None else range(len(captions)), pa.int64())}
    if image_ids is not None:
        columns["image_id"] = pa.array(image_ids, pa.int64())
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    storage.write_bytes(uri, buf.getvalue())


def captions_from_gigagan_txt(data: bytes) -> list[str]:
    """Return the 30,000 captions of GigaGAN's captions.txt after checking its md5 (one per line, in order)."""
    md5 = hashlib.md5(data).hexdigest()
    if md5 != CAPTIONS_TXT_MD5:
        raise ValueError(f"captions.txt has md5 {md5}, not {CAPTIONS_TXT_MD5}: it is not GigaGAN's COCO-2014 30k list "
                         "(copies: SiD-LSG prompts/captions.txt, DMD2 main/coco_eval/captions_coco14_test.txt)")
    captions = data.decode("utf-8").splitlines()
    assert len(captions) == CAPTIONS_TXT_LINES, len(captions)  # implied by the md5
    return captions


def captions_from_coco_annotations(data: bytes, n: int | None = None, seed: int = 0) -> tuple[list[str], list[int]]:
    """Return (captions, image_ids): one caption per val2014 image, drawn with `seed`; n images drawn if given.

    Images are taken in image-id order; each gets one of its (about five) captions, sorted by annotation id, drawn
    with random.Random(seed), as GigaGAN's loader does with `random.randint(0, 4)`. With `n`, n images are drawn
    first with the same generator and kept in image-id order (DMD2's SDXL protocol: 10k random val2014 prompts).
    """
    annotations = json.loads(data)
    if "annotations" not in annotations:
        raise ValueError("the annotations file has no 'annotations' list: expected COCO's captions_val2014.json")
    by_image: dict[int, list[tuple[int, str]]] = {}
    for a in annotations["annotations"]:
        by_image.setdefault(int(a["image_id"]), []).append((int(a["id"]), a["caption"]))
    rng = random.Random(seed)
    ids = sorted(by_image)
    if n is not None:
        if not 0 < n <= len(ids):
            raise ValueError(f"n={n} must be between 1 and the {len(ids)} images of the annotations file")
        ids = sorted(rng.sample(ids, n))
    captions = []
    for i in ids:
        options = sorted(by_image[i])
        captions.append(" ".join(options[rng.randrange(len(options))][1].split()))  # COCO captions carry \n, spaces
    return captions, ids
