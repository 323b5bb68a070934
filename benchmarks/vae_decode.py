"""VAE decode speed of the SD1.5-config VAE (random weights) per variant, and how far each moves the pixels.

The evaluate stage decodes in fp32 because that is the precision every VAE is safe in; decode is ~70% of an
evaluation's GPU time (eval_throughput_h100.json). This script asks what torch.compile buys without changing the
precision: each variant decodes the same latents, is timed between synchronizations after a warm-up (which also
compiles), and its uint8 images are compared with eager fp32 NCHW, the stage's path.

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
from common import RESULTS, record  # noqa: E402
from eval_throughput import timed  # noqa: E402

VARIANTS = {  # name: (dtype, channels_last, compile)
    "fp32_eager": (torch.float32, False, False),
    "fp32_compiled": (torch.float32, False, True),
    "fp32_compiled_channels_last": (torch.float32, True, True),
    "fp16_eager": (torch.float16, False, False),
    "fp16_compiled_channels_last": (torch.float16, True, True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=8, help="timed batches (one more warms up)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--smoke", action="store_true", help="tiny VAE on the CPU, eager variants only")
    p.add_argument("--file", default=None, help="default vae_decode_<gpu>.json")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()

    from diffusers import AutoencoderKL

    from sidflow.toy.tiny import SD15, tiny_configs

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    torch.backends.cudnn.benchmark = True  # as the evaluate stage sets it
    config = tiny_configs(sample_size=64)["vae"] if args.smoke else SD15["vae"]
    names = args.variants.split(",")
    if args.smoke:  # eager only: compiling on the CPU takes minutes and measures nothing of use
        names = [v for v in names if not VARIANTS[v][2]]
    torch.manual_seed(0)
    with torch.device(device):
        base = AutoencoderKL(**config).eval().requires_grad_(False)
    size = config["sample_size"] // 2 ** (len(config["block_out_channels"]) - 1)
    g = torch.Generator().manual_seed(0)
    lat = [torch.randn(args.batch, 4, size, size, generator=g).to(device) for _ in range(args.batches + 1)]

    metrics: dict = {"images_per_s": {}, "vs_fp32_eager": {}}
    ref = None
    for name in names:
        dtype, nhwc, compiled = VARIANTS[name]
        vae = copy.deepcopy(base).to(dtype)
        if nhwc:
            vae.to(memory_format=torch.channels_last)
        fn = torch.compile(vae.decode) if compiled else vae.decode

        def decode(x, vae=vae, fn=fn, nhwc=nhwc):
            x = (x / base.config.scaling_factor).to(vae.dtype)
            y = fn(x.contiguous(memory_format=torch.channels_last) if nhwc else x).sample.float()
            return (y * 127.5 + 128).clamp(0, 255).to(torch.uint8).cpu().numpy()

        with torch.no_grad():
            decode(lat[0])
            images, t = timed(lambda: np.concatenate([decode(x) for x in lat[1:]]), device)
        metrics["images_per_s"][name] = round(args.batch * args.batches / t, 1)
        if ref is None:
            ref = images
        else:
            diff = np.abs(images.astype(np.int16) - ref)
            metrics["vs_fp32_eager"][name] = {"mean_abs_levels": round(float(diff.mean()), 5),
                                              "fraction_changed": round(float((diff > 0).mean()), 6),
                                              "max_abs_levels": int(diff.max())}
        print(name, metrics["images_per_s"][name], metrics["vs_fp32_eager"].get(name), flush=True)
        del vae, fn
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    tag = "h100" if "H100" in gpu else "h200" if "H200" in gpu else "tiny_cpu" if args.smoke else "gpu"
    record("vae_decode", args.file or f"vae_decode_{tag}.json", int(device.type == "cuda"), metrics,
           {k: v for k, v in vars(args).items() if k != "out"} | {"weights": "random (SD1.5 VAE config)"},
           Path(args.out))


if __name__ == "__main__":
    main()
