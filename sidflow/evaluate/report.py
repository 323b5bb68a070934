"""What an evaluation leaves behind besides metrics.json: per-image scores, a captioned sample grid, a table row."""

import io
import textwrap

import numpy as np

from sidflow import storage

MIN_TILE = 128  # toy images (32 px) are enlarged, nearest-neighbour, so their captions fit under them


def scores_parquet(uri: str, rows: np.ndarray, captions: list[str], seeds: list[int], image_ids: list[int] | None,
                   scores: np.ndarray) -> None:
    """Write one row per image: row, seed, caption, (image_id,) score."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"row": rows, "seed": [seeds[i] for i in rows], "caption": [captions[i] for i in rows]}
    if image_ids is not None:
        columns["image_id"] = [image_ids[i] for i in rows]
    columns["clip"] = scores
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    storage.write_bytes(uri, buf.getvalue())


def captioned_grid(images: np.ndarray, captions: list[str], cols: int = 4) -> bytes:
    """Return PNG bytes of images [N, s, s, 3] tiled `cols` wide, each with its caption wrapped beneath it."""
    from PIL import Image, ImageDraw, ImageFont

    n, size = len(images), images.shape[1]
    scale = max(1, -(-MIN_TILE // size))
    tile = size * scale
    font = ImageFont.load_default()
    chars = max(8, tile // 7)  # the default bitmap font is about 6 px wide
    wrapped = [textwrap.wrap(c, chars)[:4] for c in captions]
    text_h = 12 * max(len(w) for w in wrapped) + 6
    cols = min(cols, n)
    rows = -(-n // cols)
    sheet = Image.new("RGB", (cols * tile, rows * (tile + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, lines) in enumerate(zip(images, wrapped)):
        x, y = (i % cols) * tile, (i // cols) * (tile + text_h)
        sheet.paste(Image.fromarray(image).resize((tile, tile), Image.NEAREST), (x, y))
        draw.multiline_text((x + 3, y + tile + 2), "\n".join(lines), fill="black", font=font, spacing=2)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def side_by_side(panels: list[tuple[str, bytes]], gap: int = 12) -> bytes:
    """Return PNG bytes of PNG images (captioned grids of the same prompts) side by side, each headed by its label."""
    from PIL import Image, ImageDraw, ImageFont

    images = [Image.open(io.BytesIO(png)).convert("RGB") for _, png in panels]
    head = 20
    sheet = Image.new("RGB", (sum(i.width for i in images) + gap * (len(images) - 1),
                              head + max(i.height for i in images)), "white")
    draw, font, x = ImageDraw.Draw(sheet), ImageFont.load_default(), 0
    for (label, _), image in zip(panels, images):
        draw.text((x + 3, 4), label, fill="black", font=font)
        sheet.paste(image, (x, head))
        x += image.width + gap
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def markdown_row(metrics: dict) -> str:
    """Return a header and one row for a results table, in the style of evaluation.md's anchor table."""
    s = metrics["sampler"]
    steps = s["steps"] if s["kind"] == "generator" else f"{s['steps']} ({s['sampler']}, κ={s['kappa']})"
    return ("| model | steps | FID | CLIP | protocol | images |\n|---|---|---|---|---|---|\n"
            f"| {metrics['model']} | {steps} | {metrics['fid']:.2f} | {metrics['clip']:.4f} | {metrics['protocol']} "
            f"| {metrics['images']} |\n")
