"""Throughput of the evaluate stage's image loop, and what a faster precision changes in FID and CLIP.

Networks of the exact architectures with **random weights** (no download): the SD1.5-config UNet, CLIP-L text
tower and VAE as a one-step generator (t_init = 625), OpenCLIP ViT-g-14, and as the Inception stand-in
torchvision's inception_v3 (random weights, 2048-d pool3 at 299²: clean-fid's TorchScript
inception-2015-12-05.pt is the same architecture family but cannot be downloaded here). Reference statistics
are cached in a real evaluation, so the projection adds only the final FID computation.

Each component is timed on --parts images (seeds other than the end-to-end ones) after one warm-up batch (which
also compiles; its extra time is recorded as the compile time), between torch.cuda.synchronize() calls: the UNet,
the VAE decode eager fp32, eager in the stage's auto precision (fp16 for this VAE, as SiD-LSG's generate_onestep.py
decodes), compiled fp32 and compiled auto, and, with --vae-sweep, eager per dtype and memory layout; the CPU chain
(crop, Lanczos 256, clean-fid bicubic 299, CLIP preprocessing) in a thread pool, Inception, and CLIP in fp32 / TF32 /
fp16 on the same images. The pixel change and same-seed FID of each decode against eager fp32 are set beside the
floor: eager fp32 itself at half the batch (other cuDNN kernels). Then the stage's own loop
(`sidflow.evaluate.shards.evaluate_rows`) runs on --n images, same prompts and seeds, in five passes: strict (VAE
fp32 eager, CLIP fp32 as GigaGAN), the stage's defaults, the floor (strict at half the batch), SiD-LSG's harness (VAE
fp16 eager, CLIP fp32), and the defaults with the VAE in fp32; with --workers-sweep the default pass again per CPU
thread count. The projected 30k minutes add the compile time once and the final FID. ΔFID = FID(pass) −
FID(strict) against a reference made of the component images (other seeds, strict path); ΔCLIP = difference of the
mean scores. With random weights FID is ~10³ and a change of kernels alone (the floor) moves it by more than 0.05,
so the bar of 0.05 reads against the floor and the paper's own harness, not against zero.

  python benchmarks/eval_throughput.py --n 2048 --parts 512    # one CUDA GPU (~9 min on an H100; 5 passes)
  python benchmarks/eval_throughput.py --smoke --out /tmp/r     # CPU, tiny models, seconds
"""

import argparse
import copy
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import RESULTS, build_generator, device_tag, record, timed  # noqa: E402

TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "patch_size": 32,
                                             "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def captions(n: int) -> list[str]:
    """Return n COCO-like captions of varied length."""
    things = ["cat", "dog", "bus", "kite", "pizza", "giraffe", "surfboard", "clock", "train", "bench"]
    places = ["on a table", "next to a red building", "in a grassy field near a lake", "at night", ""]
    return [f"A {things[i % 10]} {places[i % 5]} photographed from the side, number {i}".replace("  ", " ")
            for i in range(n)]


def build_inception(device, dims: int = 2048):
    """Return the stand-in FID extractor: torchvision inception_v3 (random weights) → 2048-d pool3 at 299², the
    first `dims` of them (smoke runs keep 64: a 2048² eigendecomposition per FID is seconds on a CPU)."""
    from torchvision.models import inception_v3

    from sidflow.evaluate.features import FeatureExtractor
    from sidflow.evaluate.resize import clean_resize

    torch.manual_seed(0)
    net = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
    net.fc = torch.nn.Identity()
    # Random weights with BatchNorm's default running statistics make every feature ≈ 0 (FID would read 0 for
    # anything): set the statistics once from noise images, so features vary with the image as trained ones do.
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batch
    with torch.no_grad():
        net.train()(torch.rand(8, 3, 299, 299) * 2 - 1)
    net = net.to(device).eval()
    return FeatureExtractor("torchvision-inception_v3-random", clean_resize, lambda x: net((x - 128) / 128)[:, :dims],
                            torch.device(device))


def build_clip(smoke: bool, device):
    """Return (model, preprocess, tokenizer) of OpenCLIP ViT-g-14 (tiny in smoke runs), random weights, fp32."""
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    torch.manual_seed(0)
    with torch.device(device):
        model = open_clip.model.CLIP(**TINY_CLIP) if smoke else open_clip.create_model("ViT-g-14", device=device)
    preprocess = open_clip.image_transform(224, is_train=False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)
    return model.eval().requires_grad_(False), preprocess, open_clip.get_tokenizer("ViT-g-14")


def batches(n: int, batch: int) -> list[range]:
    return [range(i, min(i + batch, n)) for i in range(0, n, batch)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2048, help="images of each end-to-end pass")
    p.add_argument("--parts", type=int, default=1024, help="images of each component timing (other seeds: they are "
                                                          "also the ΔFID reference)")
    p.add_argument("--batch", type=int, default=32, help="generation batch (the stage's --batch)")
    p.add_argument("--clip-batch", type=int, default=128, help="batch of the CLIP and Inception component timings")
    p.add_argument("--vae-sweep", action="store_true", help="also time VAE decode per dtype and memory layout "
                                                                "(vae_decode.sweep)")
    p.add_argument("--workers", type=int, default=None, help="CPU threads (the stage's --workers, same default)")
    p.add_argument("--workers-sweep", default="", help="comma-separated thread counts: the default pass again at each")
    p.add_argument("--passes", default="strict,floor_half_batch,sid_lsg_harness,default,vae_fp32",
                   help="end-to-end passes to run (strict and default always run: the others are compared with them)")
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU, a few images (keeps the script alive)")
    p.add_argument("--file", default=None, help="result file name (default eval_throughput_<gpu>.json)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    if args.smoke:
        args.n, args.parts, args.batch, args.clip_batch = 8, 4, 4, 4
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # its dtype-cast notices are not for this table

    from vae_decode import with_vae

    from sidflow.evaluate.clipscore import openclip_scorer
    from sidflow.evaluate.fid import feature_stats, frechet_distance
    from sidflow.evaluate.protocol import PROTOCOLS, PromptSet
    from sidflow.evaluate.sampling import set_precision, vae_auto_dtype
    from sidflow.evaluate.shards import default_workers, evaluate_rows, prepare_image
    from sidflow.toy.tiny import SD15, tiny_configs

    args.workers = args.workers or default_workers()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels, as the stage does
        torch.cuda.reset_peak_memory_stats()
    protocol = PROTOCOLS["coco30k"]
    sampler = build_generator(tiny_configs(sample_size=64) if args.smoke else SD15, device)
    set_precision(sampler, "fp16" if device.type == "cuda" else "fp32", "fp32")
    compile_vae = device.type == "cuda"  # as the stage: compiling on the CPU is minutes for nothing

    auto = vae_auto_dtype(sampler.nets)  # the stage's default decode precision for this VAE: fp16 for SD1.5's
    samplers = {"eager_fp32": sampler, f"eager_{auto}": with_vae(sampler, auto),  # eager fp16: SiD-LSG's harness
                **{f"compiled_{d}": with_vae(sampler, d, compiled=compile_vae, batch=args.batch)
                   for d in ("fp32", auto)}}
    extractor = build_inception(device, 64 if args.smoke else 2048)
    clip, preprocess, tokenizer = build_clip(args.smoke, device)
    scorers = {p: openclip_scorer(clip if p in ("fp32", "tf32") else copy.deepcopy(clip), preprocess, tokenizer,
                                  "random", device, p) for p in ("fp32", "tf32", "fp16")}
    n, m = args.n, min(args.parts, args.n)
    prompts = PromptSet(captions(n + m), list(range(n + m)), None, "bench")  # rows n.. : the components' own seeds
    metrics: dict = {}
    tag = device_tag(device, args.smoke)
    config = {**vars(args), "cpu_threads": args.workers, "unet_dtype": sampler.unet_dtype,
              "weights": "random (published configs, no download)",
              "inception": "torchvision inception_v3, random weights, BatchNorm statistics set from noise: stand-in "
                           "for clean-fid's TorchScript (same family, 2048-d pool3 at 299)",
              "reference": "cached statistics (not recomputed); the ΔFID reference is the strict path's images of "
                           "other seeds (the component set)"}
    save = lambda final=False: record("eval_throughput", args.file or f"eval_throughput_{tag}.json", 1,  # noqa: E731
                                      metrics, config, Path(args.out), final=final)

    # Components, each on the m images of rows n..n+m-1 after a warm-up batch (which also compiles).
    rows = range(n, n + m)
    caps = lambda idx: [prompts.captions[i] for i in idx]  # noqa: E731
    parts = [range(b.start + n, b.stop + n) for b in batches(m, args.batch)]
    sampler.latents(caps(parts[0]), list(parts[0]))
    lat, t_unet = timed(lambda: [sampler.latents(caps(b), list(b)) for b in parts], device)
    decoded, decode_s, compile_s = {}, {}, {}
    for name, s in samplers.items():
        _, t_first = timed(lambda: s.decode(lat[0]), device)
        decoded[name], decode_s[name] = timed(lambda: np.concatenate([s.decode(x) for x in lat]), device)
        compile_s[name] = max(0.0, t_first - decode_s[name] * len(lat[0]) / m)  # the warm-up's extra time
    # The eager decode is not bit-stable either: at another batch size cuDNN picks other kernels. Its pixel change
    # and FID shift are the floor a compiled or faster decode is compared with.
    half = [y for x in lat for y in x.split(max(1, len(x) // 2))]
    decoded["eager_fp32_half_batch"] = np.concatenate([sampler.decode(x) for x in half])
    images = decoded["eager_fp32"]
    with ThreadPoolExecutor(args.workers) as pool:
        prepare = lambda im: prepare_image(im, protocol, extractor, scorers["fp32"])  # noqa: E731
        prepared, t_cpu = timed(lambda: list(pool.map(prepare, images)), device)
        others = {k: [x[0] for x in pool.map(prepare, v)] for k, v in decoded.items() if k != "eager_fp32"}
    fid_in, clip_in = np.stack([x[0] for x in prepared]), [x[1] for x in prepared]
    extractor(fid_in[: args.clip_batch])
    ref_feats, t_inc = timed(lambda: np.concatenate([extractor(fid_in[b.start : b.stop])
                                                     for b in batches(m, args.clip_batch)]), device)
    ref = feature_stats(ref_feats)
    metrics["decode_fid_vs_eager_fp32_same_seeds"] = {
        k: round(frechet_distance(*feature_stats(np.concatenate([extractor(np.stack(v[b.start : b.stop]))
                                                                 for b in batches(m, args.clip_batch)])), *ref), 5)
        for k, v in others.items()}
    clip_times, clip_scores = {}, {}
    for name, scorer in scorers.items():
        scorer(clip_in[: args.clip_batch], caps(rows[: args.clip_batch]))
        clip_scores[name], clip_times[name] = timed(
            lambda: np.concatenate([scorer(clip_in[b.start : b.stop], caps(rows[b.start : b.stop]))
                                    for b in batches(m, args.clip_batch)]), device)
    metrics["components_images_per_s"] = {
        "unet_one_step_fp16": round(m / t_unet, 1),
        **{f"vae_decode_{k}": round(m / v, 1) for k, v in decode_s.items()},
        "cpu_crop_lanczos_bicubic_clipprep": round(m / t_cpu, 1), "inception_fp32": round(m / t_inc, 1),
        **{f"clip_vit_g14_{k}": round(m / v, 1) for k, v in clip_times.items()}}
    compile_s = {k: v for k, v in compile_s.items() if samplers[k].decode_batch is not None}  # noise otherwise
    metrics["vae_compile_seconds"] = {k: round(v, 1) for k, v in compile_s.items()}
    metrics["vae_vs_eager_fp32_pixels"] = {}
    for name, im in decoded.items():
        if name != "eager_fp32":  # eager_fp32_half_batch: the floor
            diff = np.abs(images.astype(np.int16) - im)
            metrics["vae_vs_eager_fp32_pixels"][name] = {
                "mean_abs_levels": round(float(diff.mean()), 5), "fraction_changed": round(float((diff > 0).mean()), 5),
                "max_abs_levels": int(diff.max())}
    metrics["clip_vs_fp32_same_images"] = {
        k: {"delta_mean": round(float(v.mean() - clip_scores["fp32"].mean()), 7),
            "max_abs_per_image": round(float(np.abs(v - clip_scores["fp32"]).max()), 7)}
        for k, v in clip_scores.items() if k != "fp32"}
    if args.vae_sweep:
        from vae_decode import EAGER, sweep

        metrics["vae_decode"] = sweep(sampler, lat, device, EAGER.split(","))
    save()

    # The stage's loop end to end on rows 0..n-1, same prompts and seeds: strict (VAE fp32 eager, GigaGAN-exact
    # CLIP); the floor: strict again at half the batch, where only cuDNN's kernel choice differs, so its ΔFID is
    # what this measurement reads for a change that is no change; SiD-LSG's own harness (generate_onestep.py
    # decodes in fp16, eager), whose FID is the one the paper reports; the stage's defaults; the defaults with
    # the VAE in fp32.
    from sidflow.stages.evaluate import EvaluateConfig

    default = EvaluateConfig()
    assert (default.vae_dtype, default.compile_vae) == ("auto", True), "the default pass below assumes these"
    half_batch = max(1, args.batch // 2)
    settings = {"strict": ("eager_fp32", "fp32", args.batch),  # the default pass second: a cut-short run keeps both
                "default": (f"compiled_{auto}", default.clip_precision, args.batch),
                "floor_half_batch": ("eager_fp32", "fp32", half_batch),
                "sid_lsg_harness": (f"eager_{auto}", "fp32", args.batch),
                "vae_fp32": ("compiled_fp32", default.clip_precision, args.batch)}
    settings = {k: v for k, v in settings.items() if k in {"strict", "default", *args.passes.split(",")}}
    def run(key: str, clip_precision: str, batch: int, workers: int | None) -> tuple:  # (ShardResult, seconds)
        return timed(lambda: evaluate_rows(range(n), prompts, samplers[key], protocol, extractor,
                                           scorers[clip_precision], batch, "bench", workers=workers), device)

    runs, minutes, ips = {}, {}, {}
    for name, (key, clip_precision, batch) in settings.items():
        runs[name] = run(key, clip_precision, batch, args.workers)
        ips[name] = n / runs[name][1]
        print(name, round(ips[name], 2), "img/s", flush=True)
        metrics["images_per_s_so_far"] = {k: round(v, 2) for k, v in ips.items()}  # replaced by `passes` at the end
        save()
    by_workers = metrics["default_images_per_s_by_workers"] = []  # a list: a count may be given more than once
    for w in [int(x) for x in args.workers_sweep.split(",") if x]:
        _, t = run(*settings["default"], w)
        by_workers.append({"workers": w, "images_per_s": round(n / t, 2)})
        print("default, workers", w, by_workers[-1]["images_per_s"], "img/s", flush=True)
        save()
    metrics.pop("images_per_s_so_far", None)
    stats = {k: feature_stats(r.features) for k, (r, _) in runs.items()}
    fid = {k: frechet_distance(*v, *ref) for k, v in stats.items()}
    clip_mean = {k: float(r.scores.mean()) for k, (r, _) in runs.items()}
    rng = np.random.default_rng(0)
    _, t_fid = timed(lambda: 0.0 if args.smoke else frechet_distance(
        *feature_stats(rng.normal(size=(30_000, 2048)).astype(np.float32)), *ref), device)
    for name, (key, *_) in settings.items():
        minutes[name] = round((30_000 / ips[name] + compile_s.get(key, 0.0) + t_fid) / 60, 2)
    metrics.update({
        "images_measured": n,
        "images_per_s": round(ips["default"], 2),
        "projected_30k_minutes": minutes["default"],
        "passes": {k: {"images_per_s": round(ips[k], 2), "projected_30k_minutes": minutes[k],
                       "fid_vs_reference": round(fid[k], 4), "clip": round(clip_mean[k], 6),
                       "delta_fid_vs_strict": round(fid[k] - fid["strict"], 5),
                       "delta_clip_vs_strict": round(clip_mean[k] - clip_mean["strict"], 7),
                       "fid_vs_strict_images": round(frechet_distance(*stats[k], *stats["strict"]), 5)}
                   for k in runs},
        "settings": {k: {"vae_dtype": samplers[v].vae_dtype, "compile_vae": samplers[v].decode_batch is not None,
                         "clip_precision": p, "batch": b} for k, (v, p, b) in settings.items()},
        "final_fid_seconds": round(t_fid, 1),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    })
    save(final=True)


if __name__ == "__main__":
    main()
