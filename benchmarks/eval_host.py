"""Does the evaluate loop's CPU work slow the thread that feeds the GPU? (the spread of eval_throughput's default pass)

With measuring on the generator's default CUDA stream, the end-to-end default pass read 47-62 images/s on H100s
whose components time alike (sweeps/eval_throughput_h100*_default_stream.json), while its GPU work alone allows ~66.
Every CUDA launch of the eager UNet lets go of Python's GIL and takes it back; when a CPU thread holds it then, the
launching thread waits up to the switch interval (5 ms by default). Here the one-step SD1.5-config generator (random
weights, UNet fp16, VAE fp16 compiled: the stage's defaults) generates batches in the main thread while W threads
run the stage's per-image CPU chain (`prepare_image`: crop, Lanczos, clean-fid bicubic, CLIP preprocessing) without
pause, for each W and switch interval; the generator's images/s and the chain's are timed. Only timing changes: the
images are the same in every setting.

With --loop N the stage's own loop (`evaluate_rows`, the defaults: VAE fp16 compiled, ViT-g-14 fp16, the Inception
stand-in, 4 threads) then runs on N images with each of its parts timed where it is called: the generator in the
main thread, features and scores in the measuring thread, the per-image chain in the pool (summed over threads).
Each part's seconds run until its results are on the host, so they include waiting for the other thread's GPU work.

On an H100 host (eval_host_h100.json) the generator keeps 88.5 / 88.3 / 86.8 images/s under 0 / 2 / 4 chain threads
and drops to 57.7 under 8; a 0.5 ms switch interval changes none of it. So at the stage's 4 threads the chain does
not starve the generator. The loop on the default stream (sweeps/eval_host_loop_h100_default_stream.json, --loop
1024: 55.9 images/s) had the generator at 64.9 images/s instead of 83-87 alone, and the measuring thread spending 17.0
of the 18.3 s in feature and score calls whose own GPU work is ~2 s. Measuring on a stream of its own (the stage since
28d5f94, high priority since 05e0822) lifted the stage's default pass to 61-67 images/s (eval_throughput_h100*.json).
This loop read 50.0 and 54.2 then, but as a first full pass after a one-batch warm-up: --loop also runs the loop once
with no part timed before the timed pass, and on 2048 images (eval_host_loop2048_h100.json) the first pass read 56.3
images/s, the second 63.6 (the generator in it 69.4), as the stage's passes.

  python benchmarks/eval_host.py                      # one CUDA GPU (~2 min on an H100)
  python benchmarks/eval_host.py --smoke --out /tmp/r  # CPU, tiny models, seconds
"""

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from common import RESULTS, device_tag, record  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=6, help="timed generator batches per setting")
    p.add_argument("--workers", default="0,2,4,8", help="CPU threads running the per-image chain")
    p.add_argument("--switch-ms", default="5,0.5", help="Python thread switch intervals (5 is Python's default)")
    p.add_argument("--loop", type=int, default=0, help="then time the parts of the stage's loop on this many images")
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU")
    p.add_argument("--file", default=None, help="default eval_host_<gpu>.json")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    if args.smoke:
        args.batch, args.batches = 2, 1

    from common import build_generator
    from eval_throughput import build_clip, build_inception, captions
    from vae_decode import with_vae

    from sidflow.evaluate.clipscore import openclip_scorer
    from sidflow.evaluate.protocol import PROTOCOLS
    from sidflow.evaluate.sampling import set_precision, vae_auto_dtype
    from sidflow.evaluate.shards import prepare_image
    from sidflow.toy.tiny import SD15, tiny_configs

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    torch.backends.cudnn.benchmark = True
    sampler = build_generator(tiny_configs(sample_size=64) if args.smoke else SD15, device)
    set_precision(sampler, "fp16" if device.type == "cuda" else "fp32", "fp32")
    sampler = with_vae(sampler, vae_auto_dtype(sampler.nets), compiled=device.type == "cuda", batch=args.batch)
    # The chain's cost does not depend on the networks' size: the tiny CLIP has ViT-g-14's 224 preprocessing.
    extractor = build_inception("cpu")
    clip, preprocess, tokenizer = build_clip(True, "cpu")
    scorer = openclip_scorer(clip, preprocess, tokenizer, "random", torch.device("cpu"), "fp32")
    protocol = PROTOCOLS["coco30k"]
    caps = captions(args.batch)
    images = sampler(caps, list(range(args.batch)))  # warm-up (compiles the decode); the chain's input

    def timed_setting(workers: int, switch_s: float) -> tuple[float, float]:
        stop, done = threading.Event(), [0] * workers

        def chain(k: int) -> None:
            while not stop.is_set():
                prepare_image(images[done[k] % len(images)], protocol, extractor, scorer)
                done[k] += 1

        old = sys.getswitchinterval()
        sys.setswitchinterval(switch_s)
        threads = [threading.Thread(target=chain, args=(k,), daemon=True) for k in range(workers)]
        try:
            for t in threads:
                t.start()
            sampler(caps, list(range(args.batch)))  # one batch under load before timing
            start, before = time.perf_counter(), sum(done)
            for b in range(args.batches):
                sampler(caps, list(range(b * args.batch, (b + 1) * args.batch)))  # returns host uint8: synchronized
            seconds = time.perf_counter() - start
            chained = sum(done) - before
        finally:
            stop.set()
            for t in threads:
                t.join()
            sys.setswitchinterval(old)
        return args.batch * args.batches / seconds, chained / seconds

    gen, cpu = {}, {}
    for ms in [float(x) for x in args.switch_ms.split(",")]:
        for w in [int(x) for x in args.workers.split(",")]:
            key = f"workers_{w}_switch_{ms:g}ms"
            g, c = timed_setting(w, ms / 1000)
            gen[key], cpu[key] = round(g, 2), round(c, 1)
            print(key, gen[key], "generator img/s,", cpu[key], "chain img/s", flush=True)
    metrics = {"generator_images_per_s": gen, "cpu_chain_images_per_s": cpu}
    if args.loop:
        metrics["loop"] = loop_parts(sampler, protocol, args.loop, args.batch, args.smoke, device)
        print("loop", metrics["loop"], flush=True)
    tag = device_tag(device, args.smoke)
    record("eval_host", args.file or f"eval_host_{tag}.json", int(device.type == "cuda"),
           metrics,
           {k: v for k, v in vars(args).items() if k != "out"} | {"weights": "random (SD1.5 configs)"},
           Path(args.out))


class Clocked:
    """A callable that adds up the wall seconds of its calls; anything else is the wrapped object's."""

    def __init__(self, fn):
        self.fn, self.seconds, self.calls = fn, 0.0, 0
        self.lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        with self.lock:
            self.seconds += time.perf_counter() - start
            self.calls += 1
        return out

    def __getattr__(self, name):
        return getattr(self.fn, name)


def loop_parts(sampler, protocol, n: int, batch: int, smoke: bool, device) -> dict:
    """Run `evaluate_rows` at the stage's defaults on n images and return where its time went."""
    from eval_throughput import build_clip, build_inception, captions

    import sidflow.evaluate.shards as shards
    from sidflow.evaluate.clipscore import openclip_scorer
    from sidflow.evaluate.protocol import PromptSet

    clip, preprocess, tokenizer = build_clip(smoke, device)
    scorer = Clocked(openclip_scorer(clip, preprocess, tokenizer, "random", device, "fp16"))
    extractor, generate = Clocked(build_inception(device)), Clocked(sampler)
    prompts = PromptSet(captions(n + batch), list(range(n + batch)), None, "bench")
    workers = shards.default_workers()
    shards.evaluate_rows(range(n, n + batch), prompts, generate, protocol, extractor, scorer, batch, "warm-up",
                         workers=workers)
    start = time.perf_counter()  # the loop as the stage runs it, no part timed: the first full pass after warm-up
    shards.evaluate_rows(range(n), prompts, sampler, protocol, extractor.fn, scorer.fn, batch, "bench",
                         workers=workers)
    unwrapped = time.perf_counter() - start
    for part in (generate, extractor, scorer):
        part.seconds = part.calls = 0
    prepare, shards.prepare_image = shards.prepare_image, Clocked(shards.prepare_image)
    try:
        start = time.perf_counter()
        shards.evaluate_rows(range(n), prompts, generate, protocol, extractor, scorer, batch, "bench", workers=workers)
        seconds = time.perf_counter() - start
        chain = shards.prepare_image.seconds
    finally:
        shards.prepare_image = prepare
    return {"images": n, "workers": workers, "first_pass_untimed_images_per_s": round(n / unwrapped, 2),
            "images_per_s": round(n / seconds, 2), "seconds": round(seconds, 2),
            "main_thread_generator_seconds": round(generate.seconds, 2),
            "generator_images_per_s_in_loop": round(n / generate.seconds, 2),
            "measuring_thread_seconds": {"features": round(extractor.seconds, 2), "scores": round(scorer.seconds, 2)},
            "pool_chain_thread_seconds": round(chain, 2)}


if __name__ == "__main__":
    main()
