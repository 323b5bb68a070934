"""Real text-image pairs for the adversarial term (method.md §6.2).

On storage, pairs are parquet shards with an `image` column (encoded PNG/JPEG bytes) and a `caption` column,
published as a directory with a manifest (`pack`, `sidflow data pack`). For training they are encoded once into VAE
latents and text embeddings, each rank encoding its share of the shards, and published under the run's output
(`encoded`), so a restarted or resumed run re-encodes nothing; every rank then reads the rows it draws from that
cache.
"""

import io
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sidflow import storage

ROWS_PER_SHARD = 1000
ENCODE_BATCH = 16
CACHE_INFO = "pairs.json"
PART_INFO = "part.json"  # one rank's share of an encoding, before pairs.json joins them


@dataclass
class PackResult:
    out: str
    rows: int
    shards: int
    skipped: int  # images that did not decode (corrupt, truncated, not an image)


def _decoded(data: bytes):
    # The image as RGB, or None when it does not decode to the end (a truncated file fails only on load()).
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


def pack(rows: Iterator[tuple[bytes, str]], out: str, rows_per_shard: int = ROWS_PER_SHARD) -> PackResult:
    """Write (image bytes, caption) rows as parquet shards published at `out` (manifest last); images that do not
    decode are skipped and counted, empty captions are kept (the prompt '' is a valid condition)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard={rows_per_shard} must be at least 1")
    with tempfile.TemporaryDirectory(prefix="sidflow-pack-") as tmp:
        shard, n, skipped, shards = [], 0, 0, 0

        def flush():
            nonlocal shard, shards
            if shard:
                table = pa.table({"image": [r[0] for r in shard], "caption": [r[1] for r in shard]})
                pq.write_table(table, os.path.join(tmp, f"part-{shards:05d}.parquet"))
                shards, shard = shards + 1, []

        for data, caption in rows:
            if _decoded(data) is None:
                skipped += 1
                continue
            shard.append((data, caption))
            n += 1
            if len(shard) == rows_per_shard:
                flush()
        flush()
        if n == 0:
            raise ValueError(f"no image decoded ({skipped} skipped): nothing to write to {out}")
        storage.publish_dir(tmp, out)
    return PackResult(out=out, rows=n, shards=shards, skipped=skipped)


def folder_rows(folder: str, captions: str | None = None) -> Iterator[tuple[bytes, str]]:
    """Yield (image bytes, caption) for the images of a local folder, sorted by name. Captions come from `captions`
    (a .jsonl of {"file": ..., "caption": ...} or lines `file<TAB>caption`), else from a `<image stem>.txt` beside
    each image; an image without a caption is an error."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"images={folder!r} is not a directory")
    table = _caption_table(captions) if captions else None
    images = sorted(p for p in root.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
    if not images:
        raise ValueError(f"images={folder!r} holds no .png/.jpg/.jpeg/.webp/.bmp file")
    for path in images:
        if table is not None:
            if path.name not in table:
                raise ValueError(f"{path.name} has no caption in {captions}")
            caption = table[path.name]
        elif path.with_suffix(".txt").exists():
            caption = path.with_suffix(".txt").read_text().strip()
        else:
            raise ValueError(f"{path.name} has no caption: pass --captions or put {path.stem}.txt beside it")
        yield path.read_bytes(), caption


def _caption_table(uri: str) -> dict[str, str]:
    text = storage.read_text(uri)
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if uri.endswith(".jsonl"):
            row = json.loads(line)
            out[row["file"]] = row["caption"]
        else:
            name, sep, caption = line.partition("\t")
            if not sep:
                raise ValueError(f"{uri}:{n}: expected `file<TAB>caption`")
            out[name] = caption.strip()
    return out


def coco_rows(annotations: str, images: str) -> Iterator[tuple[bytes, str]]:
    """Yield (image bytes, caption) per image of a COCO captions file (captions_train2014.json), with the image's
    first caption by annotation id, in image-id order; images missing from the folder are skipped (not counted)."""
    ann = json.loads(storage.read_bytes(annotations))
    first: dict[int, tuple[int, str]] = {}
    for a in ann["annotations"]:
        if a["image_id"] not in first or a["id"] < first[a["image_id"]][0]:
            first[a["image_id"]] = (a["id"], a["caption"].strip())
    for im in sorted(ann["images"], key=lambda im: im["id"]):
        path = Path(images) / im["file_name"]
        if im["id"] in first and path.exists():
            yield path.read_bytes(), first[im["id"]][1]


def shard_uris(uri: str) -> list[str]:
    """Return the parquet shards of pairs at `uri`: one .parquet file, or the .parquet files of a directory."""
    if uri.endswith(".parquet"):
        if not storage.exists(uri):
            raise ValueError(f"data={uri!r} does not exist")
        return [uri]
    files = sorted(f for f in storage.list_files(uri) if f.endswith(".parquet"))
    if not files:
        raise ValueError(f"data={uri!r} holds no .parquet shard (make them with `sidflow data pack`)")
    return [storage.join(uri, f) for f in files]


def check_shards(uri: str) -> int:
    """Return the number of pairs at `uri` after checking every shard's columns (a one-line error otherwise)."""
    import pyarrow.parquet as pq

    n = 0
    for shard in shard_uris(uri):
        meta = pq.ParquetFile(io.BytesIO(storage.read_bytes(shard)))
        names = set(meta.schema_arrow.names)
        if not {"image", "caption"} <= names:
            raise ValueError(f"{shard} has columns {sorted(names)}: a pairs shard needs 'image' and 'caption'")
        n += meta.metadata.num_rows
    if n == 0:
        raise ValueError(f"data={uri!r} holds no rows")
    return n


def _batches(shards: list[str]) -> Iterator[tuple[list[bytes], list[str]]]:
    # Streamed a row group at a time, on this thread (see storage.parquet_table).
    import pyarrow.parquet as pq

    for shard in shards:
        f = pq.ParquetFile(io.BytesIO(storage.read_bytes(shard)), pre_buffer=False)
        for batch in f.iter_batches(batch_size=ENCODE_BATCH, columns=["image", "caption"], use_threads=False):
            yield batch.column("image").to_pylist(), batch.column("caption").to_pylist()


def _pixels(image, size: int) -> Tensor:
    # Shorter side resized to `size` (bicubic), centre crop, to [-1, 1] as the VAE was trained: [3, size, size].
    from PIL import Image

    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
    return x.permute(2, 0, 1).float() / 127.5 - 1


class Encoded:
    """The encoded pairs of a cache directory: `size` rows, `real(indices)` -> (latents [b, C, H, W] fp32, text
    conditions [b, ...] fp32), read row by row from the shard files (memory-mapped, never loaded whole)."""

    def __init__(self, local_dir: str):
        from safetensors import safe_open

        info = json.loads((Path(local_dir) / CACHE_INFO).read_text())
        self.info, self.size = info, info["rows"]
        self.files = [safe_open(str(Path(local_dir) / name), framework="pt") for name in info["files"]]
        self.starts = torch.tensor([0, *info["rows_per_file"]]).cumsum(0)

    def real(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        x, c = [], []
        for i in idx.tolist():
            f = int(torch.searchsorted(self.starts, i, right=True)) - 1
            row = i - int(self.starts[f])
            x.append(self.files[f].get_slice("latents")[row : row + 1])
            c.append(self.files[f].get_slice("cond")[row : row + 1])
        return torch.cat(x).float(), torch.cat(c).float()


def cache_key(data: str, teacher_fingerprint: str | None, teacher_uri: str) -> dict:
    """What an encoded cache must match to be reused: the pairs' content and the teacher's VAE and text encoders."""
    manifest = storage.read_manifest(data) if not data.endswith(".parquet") else None
    content = ("sha256:" + storage.manifest_digest(manifest)) if manifest else data
    return {"data": content, "teacher": teacher_fingerprint or teacher_uri}


def encoded(teacher, data: str, cache_uri: str, key: dict, rank: int, world: int, wait) -> Encoded:
    """Return the pairs at `data` encoded by `teacher`, published at `cache_uri` on first use. Each of the `world`
    ranks encodes every world-th parquet shard into a part of its own (`rank`); `wait()` is the barrier after which
    rank 0 publishes the whole (pairs.json and the manifest, last), and the next after which every rank reads it
    (fetched once per machine). The rows are in shard order whatever the number of ranks that encoded them."""
    if not _cache_matches(cache_uri, key):
        _encode_part(teacher, data, cache_uri, key, rank, world)
        wait()
        if rank == 0:
            _publish(cache_uri, key, world)
    wait()
    if not _cache_matches(cache_uri, key):
        raise RuntimeError(f"{cache_uri} does not hold the encoded pairs of {data}")
    if not storage.is_s3(cache_uri):
        return Encoded(storage.local_path(cache_uri))
    digest = storage.manifest_digest(storage.read_manifest(cache_uri))  # a re-encoded cache is fetched anew
    return Encoded(storage.fetch_dir_once(cache_uri, storage.cache_root() / "pairs" / digest))


def _cache_matches(cache_uri: str, key: dict) -> bool:
    manifest = storage.read_manifest(cache_uri)
    if manifest is None or CACHE_INFO not in {f["path"] for f in manifest["files"]}:
        return False
    return json.loads(storage.read_text(storage.join(cache_uri, CACHE_INFO))).get("key") == key


def _part(rank: int, world: int) -> str:
    return f"part-{rank:04d}-of-{world:04d}"


@torch.no_grad()
def latents(teacher, pixels: Tensor) -> Tensor:
    """Return the fp32 latents [B, C, h, w] of images in [-1, 1] [B, 3, H, W] as real pairs are encoded: the VAE
    posterior's mean (not a draw, so a re-encode is identical) times the teacher's latent scale."""
    return (teacher.vae.encode(pixels.to(teacher.vae.dtype)).latent_dist.mean * teacher.vae_scale).float()


@torch.no_grad()
def _encode_part(teacher, data: str, cache_uri: str, key: dict, rank: int, world: int) -> None:
    # Shards rank, rank + world, ... as safetensors files named by shard, published at <cache>/<part>/ with PART_INFO.
    from tqdm import tqdm

    device = next(teacher.vae.parameters()).device
    size, shards = teacher.image_size, shard_uris(data)
    files, counts, skipped = [], [], 0
    bar = tqdm(unit="pair", desc="encode pairs", disable=rank != 0 or os.environ.get("SIDFLOW_NO_BAR") == "1")
    with tempfile.TemporaryDirectory(prefix="sidflow-pairs-") as tmp:
        for s in range(rank, len(shards), world):
            lat, cond = [], []
            for images, captions in _batches([shards[s]]):
                decoded = [(_decoded(b), c) for b, c in zip(images, captions)]
                ok = [(im, c) for im, c in decoded if im is not None]
                skipped += len(decoded) - len(ok)
                bar.update(len(decoded))
                if not ok:
                    continue
                lat.append(latents(teacher, torch.stack([_pixels(im, size) for im, _ in ok]).to(device)).cpu())
                cond.append(teacher.encode([c for _, c in ok]).float().cpu())
                if sum(len(x) for x in lat) >= ROWS_PER_SHARD:
                    _save(tmp, s, lat, cond, files, counts)
                    lat, cond = [], []
            _save(tmp, s, lat, cond, files, counts)
        bar.close()
        info = {"key": key, "files": files, "rows_per_file": counts, "skipped": skipped, "image_size": size}
        (Path(tmp) / PART_INFO).write_text(json.dumps(info, indent=2, sort_keys=True))
        storage.publish_dir(tmp, storage.join(cache_uri, _part(rank, world)))


def _save(tmp: str, shard: int, lat: list, cond: list, files: list, counts: list) -> None:
    # One safetensors file of a shard's rows: shard-<shard>-<k>, k counting that shard's files.
    from safetensors.torch import save_file

    if lat:
        name = f"shard-{shard:05d}-{sum(f.startswith(f'shard-{shard:05d}-') for f in files):04d}.safetensors"
        tensors = {"latents": torch.cat(lat).contiguous(), "cond": torch.cat(cond).contiguous()}
        save_file(tensors, os.path.join(tmp, name))
        files.append(name)
        counts.append(sum(len(x) for x in lat))


def _publish(cache_uri: str, key: dict, world: int) -> None:
    # Every part's files in shard order under one pairs.json, and one manifest over all of them, written last.
    entries, rows = [], []  # manifest entries; (file path, rows) in shard order
    skipped = 0
    for r in range(world):
        part = storage.join(cache_uri, _part(r, world))
        manifest = storage.read_manifest(part)
        info = json.loads(storage.read_text(storage.join(part, PART_INFO))) if manifest else None
        if info is None or info["key"] != key:
            raise RuntimeError(f"{part} is missing or holds other pairs: rank {r} did not finish encoding")
        entries += [{**f, "path": f"{_part(r, world)}/{f['path']}"} for f in manifest["files"]]
        rows += [(f"{_part(r, world)}/{name}", n) for name, n in zip(info["files"], info["rows_per_file"])]
        skipped += info["skipped"]
        size = info["image_size"]
    rows.sort(key=lambda fr: fr[0].split("/", 1)[1])  # shard-<s>-<k>: shard order, then the shard's own order
    if not rows:
        raise ValueError(f"no image of the pairs decoded ({skipped} skipped)")
    info = {"key": key, "rows": sum(n for _, n in rows), "rows_per_file": [n for _, n in rows],
            "files": [f for f, _ in rows], "skipped": skipped, "image_size": size}
    storage.publish_files(cache_uri, entries, {CACHE_INFO: json.dumps(info, indent=2, sort_keys=True)})
    if skipped:
        print(f"encode pairs: {skipped} of {info['rows'] + skipped} images did not decode and were skipped")
