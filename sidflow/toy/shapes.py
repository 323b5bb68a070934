"""Procedural text-to-image data: coloured shapes on plain backgrounds, 32×32 RGB, deterministic by seed.

Captions read "a red triangle on a grey background, top left". Some (shape, colour) pairs are held out of
teacher training entirely, so prompt accuracy on them measures composition rather than memory.
"""

import io
import itertools

import numpy as np

SIZE = 32
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (235, 210, 40)}
BACKGROUNDS = {"grey": (128, 128, 128), "white": (240, 240, 240), "black": (20, 20, 20)}
POSITIONS = {"top left": (9, 9), "top right": (23, 9), "bottom left": (9, 23), "bottom right": (23, 23),
             "center": (16, 16)}
HELDOUT = {("triangle", "yellow"), ("circle", "blue"), ("square", "green"), ("cross", "red")}
ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "background": tuple(BACKGROUNDS), "position": tuple(POSITIONS)}


def caption(shape: str, colour: str, background: str, position: str) -> str:
    """Return the caption of one attribute combination."""
    return f"a {colour} {shape} on a {background} background, {position}"


def parse(text: str) -> dict[str, str]:
    """Return the attributes named in a caption (inverse of `caption`)."""
    head, position = text.split(", ", 1)
    words = head.split()  # a <colour> <shape> on a <background> background
    return {"shape": words[2], "colour": words[1], "background": words[5], "position": position}


def combos(split: str = "train") -> list[tuple[str, str, str, str]]:
    """Return (shape, colour, background, position) combinations of a split: 'train', 'heldout' or 'all'."""
    out = list(itertools.product(SHAPES, COLOURS, BACKGROUNDS, POSITIONS))
    if split == "all":
        return out
    held = [c for c in out if (c[0], c[1]) in HELDOUT]
    return held if split == "heldout" else [c for c in out if (c[0], c[1]) not in HELDOUT]


def render(shape: str, colour: str, background: str, position: str, rng: np.random.Generator) -> np.ndarray:
    """Return one uint8 image [32, 32, 3]; size and position jitter come from rng."""
    img = np.empty((SIZE, SIZE, 3), np.uint8)
    img[:] = BACKGROUNDS[background]
    cx, cy = np.array(POSITIONS[position]) + rng.integers(-2, 3, size=2)
    r = rng.uniform(4.5, 6.5)
    y, x = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    dx, dy = x - cx, y - cy
    if shape == "circle":
        mask = dx**2 + dy**2 <= r**2
    elif shape == "square":
        mask = (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    elif shape == "triangle":  # apex up
        mask = (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    else:  # cross
        mask = ((np.abs(dx) <= r) & (np.abs(dy) <= r * 0.35)) | ((np.abs(dy) <= r) & (np.abs(dx) <= r * 0.35))
    img[mask] = COLOURS[colour]
    return img


def sample(n: int, seed: int, split: str = "train") -> tuple[np.ndarray, list[str]]:
    """Return n images [n, 32, 32, 3] uint8 and their captions, combinations drawn uniformly from a split."""
    rng = np.random.default_rng(seed)
    pool = combos(split)
    picks = [pool[i] for i in rng.integers(len(pool), size=n)]
    return np.stack([render(*c, rng) for c in picks]), [caption(*c) for c in picks]


def vocabulary() -> tuple[str, ...]:
    """Return every word a caption can contain (the toy tokenizer makes each a single token)."""
    words = {"a", "on", "background"} | set(SHAPES) | set(COLOURS) | set(BACKGROUNDS)
    words |= {w for p in POSITIONS for w in p.split()}
    return tuple(sorted(words))


def write_parquet(path: str, n: int, seed: int, split: str = "train") -> None:
    """Write n images as a text-image parquet (`image`: PNG bytes, `caption`) — the format train-teacher reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from sidflow import storage

    images, captions = sample(n, seed, split)
    pngs = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    buf = io.BytesIO()
    pq.write_table(pa.table({"image": pngs, "caption": captions}), buf)
    storage.write_bytes(path, buf.getvalue())


def read_parquet(path: str) -> tuple[np.ndarray, list[str]]:
    """Return images [n, H, W, 3] uint8 and captions from a text-image parquet at a URI."""
    from PIL import Image

    from sidflow import storage

    table = storage.parquet_table(storage.read_bytes(path))
    missing = {"image", "caption"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path} lacks column(s) {sorted(missing)}: a text-image parquet has 'image' and 'caption'")
    images = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in table.column("image").to_pylist()])
    return images, [str(c) for c in table.column("caption").to_pylist()]
