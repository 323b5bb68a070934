"""VAE decode speed of the SD1.5-config VAE (random weights) per variant, and how far each moves the pixels.

Decode is the largest part of an evaluation's GPU time (eval_throughput_h100.json, components_images_per_s); the
evaluate stage compiles it (compile_vae) in the precision the VAE needs (fp16 for SD1.5's). This script asks what
torch.compile buys at each precision. A variant is `<dtype>_<layout>[_compiled]` (dtype fp32|bf16|fp16, layout
contiguous|channels_last); each decodes the same latents through the stage's own `Sampler.decode` with its VAE
swapped, is timed between synchronizations after a warm-up (which also compiles), and its uint8 images are compared
with the first variant's.
`eval_throughput.py --vae-sweep` runs the eager variants through the same function.

  python benchmarks/vae_decode.py                   # one CUDA GPU (~3 min on an H100, compiles included)
  python benchmarks/vae_decode.py --smoke --out /tmp/r
"""

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import RESULTS, device_tag, record  # noqa: E402

COMPILED = "fp32_contiguous,fp32_contiguous_compiled,fp32_channels_last_compiled,fp16_contiguous," \
           "fp16_channels_last_compiled"
EAGER = "fp32_contiguous,fp32_channels_last,bf16_contiguous,bf16_channels_last,fp16_contiguous,fp16_channels_last"


def with_vae(sampler, dtype: str, layout: str = "contiguous", compiled: bool = False, batch: int = 32):
    """Return a copy of `sampler` whose VAE is its own copy in `dtype` and memory `layout`, compiled as the stage
    compiles it (`compile_decode`) if asked."""
    from sidflow.evaluate.sampling import DTYPES, compile_decode

    out = copy.copy(sampler)
    out.nets = copy.copy(sampler.nets)
    out.nets.vae = copy.deepcopy(sampler.nets.vae).to(DTYPES[dtype])
    out.nets.vae.to(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    out.vae_dtype = dtype
    if compiled:
        compile_decode(out, batch)
    return out


def sweep(sampler, lat: list, device, variants: list[str]) -> dict:
    """Return {"images_per_s": {variant: …}, "vs_first": {variant: pixel differences}} of `sampler.decode` with its
    VAE in each variant, on the latents given (lat[0] warms up and compiles; the rest are timed)."""
    from common import timed

    out: dict = {"images_per_s": {}, "vs_first": {}}
    ref, timed_lat = None, lat[1:] or lat  # one batch only (smoke runs): it warms up and is timed
    for name in variants:
        dtype, rest = name.split("_", 1)
        variant = with_vae(sampler, dtype, rest.removesuffix("_compiled"), rest.endswith("_compiled"), len(lat[0]))
        variant.decode(lat[0])
        images, t = timed(lambda: np.concatenate([variant.decode(x) for x in timed_lat]), device)
        out["images_per_s"][name] = round(sum(len(x) for x in timed_lat) / t, 1)
        if ref is None:
            ref = images
        else:
            diff = np.abs(images.astype(np.int16) - ref)
            out["vs_first"][name] = {"mean_abs_levels": round(float(diff.mean()), 5),
                                     "fraction_changed": round(float((diff > 0).mean()), 6),
                                     "max_abs_levels": int(diff.max())}
        print(name, out["images_per_s"][name], out["vs_first"].get(name), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=8, help="timed batches (one more warms up)")
    p.add_argument("--variants", default=COMPILED, help="comma-separated; the first is the reference")
    p.add_argument("--smoke", action="store_true", help="tiny VAE on the CPU, eager variants only")
    p.add_argument("--file", default=None, help="default vae_decode_<gpu>.json")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()

    from common import build_generator

    from sidflow.toy.tiny import SD15, tiny_configs

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    torch.backends.cudnn.benchmark = True  # as the evaluate stage sets it
    variants = args.variants.split(",")
    if args.smoke:  # eager only: compiling on the CPU takes minutes and measures nothing of use
        variants = [v for v in variants if not v.endswith("_compiled")]
    sampler = build_generator(tiny_configs(sample_size=64) if args.smoke else SD15, device)
    g = torch.Generator().manual_seed(0)
    shape = sampler.nets.latent_shape
    lat = [torch.randn(args.batch, *shape, generator=g).to(device) for _ in range(args.batches + 1)]
    metrics = sweep(sampler, lat, device, variants)
    tag = device_tag(device, args.smoke)
    record("vae_decode", args.file or f"vae_decode_{tag}.json", int(device.type == "cuda"), metrics,
           {k: v for k, v in vars(args).items() if k != "out"} | {"weights": "random (SD1.5 VAE config)"},
           Path(args.out))


if __name__ == "__main__":
    main()
