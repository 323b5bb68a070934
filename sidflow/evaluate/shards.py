"""The work of one evaluation, cut into shards: generate, crop/resize, features, scores; one file per shard.

Shard k holds prompts [k·size, (k+1)·size); rank r of W takes shards r, r + W, … . A shard file is written whole
(npz: rows, features, scores, the run key and the first grid images), so a restarted evaluation skips every
shard already written with the same run key. Inside a shard the CPU work of batch b (crop, Lanczos, clean-fid
bicubic, CLIP preprocessing, in a thread pool: PIL releases the GIL) and then its features and scores (on a
thread of their own) overlap the generation of batch b + 1: the GPU gets the next kernels while one thread is busy
on the CPU (tokenizing, copying), instead of idling between the steps of one sequence.
"""

import io
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from sidflow import storage
from sidflow.evaluate.protocol import PromptSet, Protocol
from sidflow.evaluate.resize import protocol_resize

SHARDS = "shards"


def shard_rows(n: int, size: int) -> list[range]:
    """Return the prompt rows of each shard: consecutive ranges of `size` (the last may be shorter)."""
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def shard_uri(output: str, k: int) -> str:
    """URI of shard k's file under the evaluation's output."""
    return storage.join(output, SHARDS, f"shard-{k:06d}.npz")


@dataclass
class ShardResult:
    """Per-image results of one shard, in row order."""

    rows: np.ndarray  # [n] int64 prompt rows
    features: np.ndarray  # [n, D] float32
    scores: np.ndarray  # [n] float64
    grid: np.ndarray  # [g, s, s, 3] uint8: the images of the first rows that go into grid.png
    key: str  # run key: what produced these numbers

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, rows=self.rows, features=self.features, scores=self.scores, grid=self.grid, key=np.str_(self.key))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "ShardResult":
        z = np.load(io.BytesIO(data), allow_pickle=False)
        return cls(z["rows"], z["features"], z["scores"], z["grid"], str(z["key"]))


def read_shard(uri: str, key: str) -> ShardResult | None:
    """Return the shard written at `uri` by a run with the same key; None if there is none yet."""
    if not storage.exists(uri):
        return None
    shard = ShardResult.from_bytes(storage.read_bytes(uri))
    if shard.key != key:
        raise ValueError(f"{uri} was written by a different evaluation (model, prompts, protocol, features, scorer "
                         "or precision changed): use a new output, or delete its shards/")
    return shard


def default_workers() -> int:
    """CPU threads for the per-image work: 4 at most. Part of it holds Python's GIL, and each thread more takes it
    from the threads that feed the GPU: on an H100 host the default pass gave 61-67 images/s at 4 threads (seven
    readings) and 70.4 at 2 (benchmarks/results/eval_throughput_h100_repeat.json); with measuring still on the
    default stream, 59-63 at 2, 47-62 at 4, 48 at 8 and 52 at 16 (sweeps/eval_throughput_h100_threads.json,
    sweeps/eval_throughput_h100_repeat_default_stream.json). 4 keeps the CPU chain (128-147 images/s at 4 threads)
    ahead of the GPU on slower hosts and at the SDXL protocol's 512 px."""
    return min(4, os.cpu_count() or 1)


def prepare_image(image: np.ndarray, protocol: Protocol, extractor, scorer) -> tuple:
    """CPU work for one image: protocol crop/resize, the extractor's and the scorer's input, the grid tile."""
    fid_image = protocol_resize(image, protocol.fid_size)
    clip_image = fid_image if protocol.clip_size == protocol.fid_size else protocol_resize(image, protocol.clip_size)
    return extractor.prepare(fid_image), scorer.prepare(clip_image), clip_image


def evaluate_rows(rows: range, prompts: PromptSet, sampler, protocol: Protocol, extractor, scorer, batch: int,
                  key: str, grid: int = 0, workers: int | None = None, image_dir: str | None = None,
                  progress=None) -> ShardResult:
    """Generate and measure the images of `rows`; keep the images of rows < `grid` for the sample grid."""
    import torch

    from sidflow.evaluate.clipscore import matmul_precision

    feats, scores, tiles = [], [], []
    pool = ThreadPoolExecutor(workers or default_workers())
    gpu = ThreadPoolExecutor(1)  # one thread: batches are measured in order, beside the generation of the next
    writes: list[Future] = []
    measuring: list[Future] = []
    # Measuring runs on a CUDA stream of its own, of high priority, so its few hundred small kernels per batch do not
    # queue behind the UNet's large ones: the default pass went from 47-62 to 61-67 images/s on H100s
    # (docs/benchmarks.md, eval_throughput_h100*.json). The kernels and so the numbers are the same.
    side = torch.cuda.Stream(extractor.device, priority=-1) if extractor.device.type == "cuda" else None

    def measure(idx: range, prepared: list[Future]) -> None:  # GPU: features and scores of a prepared batch
        done = [f.result() for f in prepared]
        with torch.cuda.stream(side):  # no-op when side is None
            feats.append(extractor(np.stack([d[0] for d in done])))
            scores.append(scorer([d[1] for d in done], [prompts.captions[i] for i in idx]))
        tiles.extend(d[2] for i, d in zip(idx, done) if i < grid)
        if progress is not None:
            progress.update(len(idx))

    # The precision is process-wide: held for the whole loop, not switched by the scorer while a decode runs.
    with matmul_precision(getattr(scorer, "matmul_precision", torch.get_float32_matmul_precision())):
        try:
            for start in range(0, len(rows), batch):
                idx = rows[start : start + batch]
                images = sampler([prompts.captions[i] for i in idx], [prompts.seeds[i] for i in idx])  # [B, H, W, 3]
                prepared = [pool.submit(prepare_image, im, protocol, extractor, scorer) for im in images]
                if image_dir is not None:
                    writes += [pool.submit(_write_png, storage.join(image_dir, f"{i:06d}.png"), im)
                               for i, im in zip(idx, images)]
                measuring.append(gpu.submit(measure, idx, prepared))
                if len(measuring) > 2:  # a slower scorer holds generation back rather than piling up batches
                    measuring.pop(0).result()
            for f in measuring + writes:
                f.result()
        finally:
            pool.shutdown(cancel_futures=True)
            gpu.shutdown(cancel_futures=True)
    dim = feats[0].shape[1] if feats else 0
    return ShardResult(np.asarray(rows, dtype=np.int64), np.concatenate(feats) if feats else np.zeros((0, dim)),
                       np.concatenate(scores) if scores else np.zeros(0), np.asarray(tiles, dtype=np.uint8), key)


def _write_png(uri: str, image: np.ndarray) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    storage.write_bytes(uri, buf.getvalue())
