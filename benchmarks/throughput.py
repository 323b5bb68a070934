"""Throughput of real SiD-LSG iterations through `sidflow distill` on a teacher built from published configs.

The SD1.5 teacher (UNet, CLIP-L text tower, VAE) has random weights: no download. The run goes through the stage
itself (validate, load, copy, train, export) with `profile` on, so each phase is timed between GPU synchronizations.
Images/s is the median over the iterations after `--warmup`. TFLOP/s counts the UNet work of one sample-iteration
(method.md §4): G forward (fake step) + fake forward·backward (×2 batch when κ1 ≠ 1) + G forward·backward +
teacher and fake forward·input-backward (×2 batch when guided), with a backward costing 2 forwards (1 for an
input-only backward), and the forward FLOPs counted by torch.utils.flop_counter. The split generator backward's
extra forward is not counted: TFLOP/s stays the useful work, comparable across the options.

A list of values for --precisions, --micro-batches, --compile, --generator-backward or --norms sweeps every
combination in one command (--runs names a chosen few instead, in order:
'bf16/12/off/joint;bf16/12/off/joint/autocast;fp32/8/off/joint'),
each run its own `sidflow distill` process (accelerate fixes the precision per process, and every run starts with
empty GPU memory and reports its own peak). A run that exhausts GPU memory is recorded as "oom" and the
sweep goes on. The record is rewritten after each run, so a sweep cut short keeps what it measured; --time-limit
ends one in time to write its last record. It adds the bf16/fp32 ratio of each setting and each setting's speed-up
over the plain one (eager, joint, fp32 norms) at the same precision and micro-batch. --torch-profile runs one more
iteration after the timed ones under torch.profiler and records where its GPU time goes: the top ops and the share
of each kind of kernel (before and after an option, side by side).

  python benchmarks/throughput.py --model sd15 --micro-batch 8 --rounds 2 --iters 6
  python benchmarks/throughput.py --model sd15 --precisions bf16,fp32 --micro-batches 12,16,24 --compile off,on \\
      --generator-backward joint,split --rounds 2 --iters 4 --torch-profile --file throughput_sd15_perf_h200.json
  python benchmarks/throughput.py --model sdxl --gpus 2 --sharding fsdp --micro-batch 1 --rounds 4 \\
      --grad-checkpointing --file throughput_sdxl_h200x2.json                  # per GPU, FSDP on 2 GPUs
  python benchmarks/throughput.py --model tiny --iters 3 --out /tmp/results      # CPU smoke run
"""

import argparse
import contextlib
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from common import MODELS, RESULTS, record, synthetic_run  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 peak of the SXM parts
AXES = {"precision": ("bf16", "fp32"), "compile": ("off", "on"), "generator_backward": ("joint", "split"),
        "norms": ("fp32", "autocast")}
# The kind of a kernel (GPU) or op (CPU): the first entry whose pattern its lower-case name contains. Attention and
# convolution come before matmul (cuDNN's kernels are implicit GEMMs), compiled kernels before the ops they fuse.
KINDS = (("attention", ("flash", "fmha", "attention", "sdpa")),
         ("convolution", ("conv", "fprop", "dgrad", "wgrad", "cudnn")),
         ("matmul", ("gemm", "nvjet", "cublas", "cutlass", "matmul", "aten::mm", "addmm", "bmm")),
         ("optimizer and EMA", ("adam", "multi_tensor", "foreach")),
         ("compiled (triton)", ("triton",)),
         ("norm", ("norm", "moments")),
         ("copy and layout", ("copy", "memcpy", "memset", "cat", "transpose", "nchw", "nhwc", "contiguous")),
         ("elementwise and reduction", ("elementwise", "reduce", "vectorized", "unrolled", "aten::")))


def forward_tflop(teacher) -> float:
    """Return TFLOP of one UNet forward on one sample (counted, not estimated), with the teacher's conditioning."""
    from torch.utils.flop_counter import FlopCounterMode

    from sidflow.teacher import score_net

    device = next(teacher.unet.parameters()).device
    x = torch.randn(1, *teacher.latent_shape, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        score_net(teacher.unet)(x, torch.tensor([500], device=device), teacher.encode(["a photo"]).to(device))
    return counter.get_total_flops() / 1e12


def forward_equivalents(k1: float, k2: float, k4: float) -> float:
    """Return UNet forward-equivalents per sample-iteration for the given κ's (method.md §4 cost line)."""
    x = lambda k: 1 if k in (0, 1) else 2  # noqa: E731  guided evaluations double the batch
    fake_step = 1 + x(k1) * 3  # G forward, fake forward + full backward
    gen_step = 3 + x(k4) * 2 + x(k2) * 2  # G forward + full backward; teacher and fake forward + input backward
    return fake_step + gen_step


def kind(name: str) -> str:
    """Return the kind of kernel or op `name` is (KINDS), or "other"."""
    low = name.lower()
    return next((k for k, patterns in KINDS if any(p in low for p in patterns)), "other")


def profile_summary(prof, top: int = 10) -> dict:
    """Return where one profiled iteration's time went: its total, the `top` ops by the GPU time of the kernels each
    launched itself (CPU time on a CPU), and the share of each kind of kernel. The ops' and the kernels' rows are
    summed apart: each kernel's time is on both."""
    from torch.autograd import DeviceType

    events = prof.key_averages()
    ops = [e for e in events if e.device_type == DeviceType.CPU and not e.key.startswith("ProfilerStep")]
    gpu = torch.cuda.is_available()
    op_time = (lambda e: e.self_device_time_total) if gpu else (lambda e: e.self_cpu_time_total)  # noqa: E731
    # The step's own GPU-side range spans its kernels: counted as a kernel it would double the total.
    kernels = [e for e in events if e.device_type != DeviceType.CPU and not e.key.startswith("ProfilerStep")]
    kernel_time = lambda e: e.device_time_total  # noqa: E731
    if not kernels:  # a CPU run: the ops' own time
        kernels, kernel_time = ops, op_time
    total = sum(kernel_time(e) for e in kernels) or 1.0  # µs
    kinds: dict[str, float] = {}
    for e in kernels:
        kinds[kind(e.key)] = kinds.get(kind(e.key), 0.0) + kernel_time(e)
    rows = sorted(ops, key=op_time, reverse=True)[:top]
    # The kernels no pattern of KINDS matched, by time: what to classify next.
    other = sorted((e for e in kernels if kind(e.key) == "other"), key=kernel_time, reverse=True)[:top]
    return {"clock": "gpu" if gpu else "cpu", "total_ms": round(total / 1000, 2),
            "top_ops": [{"op": e.key[:100], "ms": round(op_time(e) / 1000, 3),
                         "pct": round(100 * op_time(e) / total, 1), "calls": e.count} for e in rows],
            "kinds_pct": {k: round(100 * v / total, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top_other": [{"kernel": e.key[:160], "pct": round(100 * kernel_time(e) / total, 1), "calls": e.count}
                          for e in other]}


@contextlib.contextmanager
def profiled(iteration: int, into: dict):
    """Profile training iteration `iteration` (0-based, ≥ 1) of the run inside the block into `into`. The loop steps
    the fake's optimizer, then G's, once an iteration: a window ends at G's step, so it holds the previous
    iteration's EMA update and logging, then this one's fake and generator steps, a full iteration's work."""
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=activities, schedule=schedule(wait=iteration - 1, warmup=1, active=1, repeat=1),
                   on_trace_ready=lambda p: into.update(profile_summary(p)))
    steps = [0]

    def step(optimizer, args, kwargs):
        steps[0] += 1
        if steps[0] % 2 == 0:  # G's optimizer: the end of an iteration
            prof.step()

    handle = register_optimizer_step_post_hook(step)
    prof.start()
    try:
        yield
    finally:
        handle.remove()
        prof.stop()


def oom(message: str) -> bool:
    """Whether an error (or a run's log) says the GPU ran out of memory: torch's allocator (torch.OutOfMemoryError,
    also inside a compiler's error) or a library's own allocation (cuDNN's, cuBLAS's ALLOC_FAILED)."""
    return "out of memory" in message.lower() or "ALLOC_FAILED" in message


def grid(args) -> list[dict]:
    """Return the runs of the command: those --runs lists, in its order, or every combination of the listed values,
    precision first (bf16 runs first)."""
    def values(name: str, raw: str, cast=str) -> list:
        out = [cast(v) for v in raw.split(",") if v]
        bad = [v for v in out if name in AXES and v not in AXES[name]]
        if not out or bad:
            raise SystemExit(f"throughput.py: --{name.replace('_', '-')} {raw!r}: expected a comma-separated list"
                             + (f" of {', '.join(AXES[name])}" if name in AXES else ""))
        return out

    fixed = dict(x.split("=", 1) for x in getattr(args, "set", None) or [])
    if args.runs:  # an explicit list: precision/micro-batch/compile/backward[/norms] per run, e.g. bf16/12/on/split
        runs = []
        for item in filter(None, args.runs.split(";")):
            parts = [x for x in item.split("/") if "=" not in x]
            extra = dict(x.split("=", 1) for x in item.split("/") if "=" in x)
            if len(parts) not in (4, 5):
                raise SystemExit(f"throughput.py: --runs item {item!r}: expected "
                                 "precision/micro-batch/compile/backward[/norms][/key=value...]")
            runs.append({"precision": values("precision", parts[0])[0],
                         "micro_batch": values("micro_batch", parts[1], int)[0],
                         "compile": values("compile", parts[2])[0],
                         "generator_backward": values("generator_backward", parts[3])[0],
                         "norms": values("norms", parts[4] if len(parts) == 5 else args.norms)[0],
                         "set": {**fixed, **extra}})
        return runs
    axes = {"precision": values("precision", args.precisions or args.precision),
            "micro_batch": values("micro_batch", args.micro_batches or str(args.micro_batch), int),
            "compile": values("compile", args.compile),
            "generator_backward": values("generator_backward", args.generator_backward),
            "norms": values("norms", args.norms)}
    return [dict(zip(axes, combo), set=fixed) for combo in itertools.product(*axes.values())]


def label(run: dict) -> str:
    """Return a run's name in the sweep's record, e.g. 'bf16 mb12 compile split' ('... autocast-norms' with norms
    autocast under bf16; an fp32 run has no autocast, so its norms are fp32 whatever the setting)."""
    return (f"{run['precision']} mb{run['micro_batch']} {'compile' if run['compile'] == 'on' else 'eager'} "
            f"{run['generator_backward']}" + (" autocast-norms" if _autocast_norms(run) else "")
            + "".join(f" {k}={v}" for k, v in sorted(run.get("set", {}).items())))


def _autocast_norms(run: dict) -> bool:
    return run["precision"] == "bf16" and run.get("norms") == "autocast"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(MODELS), default="sd15")
    p.add_argument("--gpus", type=int, default=1, help="processes (one per GPU); figures are per GPU")
    p.add_argument("--sharding", choices=["ddp", "fsdp"], default="ddp")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--micro-batches", default=None, help="comma-separated micro-batches to sweep, e.g. 12,16,24")
    p.add_argument("--rounds", type=int, default=2, help="accumulation rounds per phase")
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--kappa", type=float, default=1.5)
    p.add_argument("--precision", choices=AXES["precision"], default="bf16")
    p.add_argument("--precisions", default=None, help="comma-separated precisions to sweep, e.g. bf16,fp32")
    p.add_argument("--compile", nargs="?", const="on", default="off",
                   help="compile the UNets' repeated blocks (the stage's compile): on (the flag alone), off, off,on")
    p.add_argument("--generator-backward", default="joint", help="the stage's generator_backward: joint, split, "
                                                                 "or joint,split")
    p.add_argument("--norms", default="fp32", help="the stage's norms: fp32, autocast, or fp32,autocast")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a DistillConfig override for every run (repeatable), e.g. channels_last=false")
    p.add_argument("--runs", default=None, help="instead of every combination: ';'-separated runs, each "
                   "precision/micro-batch/compile/backward[/norms][/key=value...] (DistillConfig overrides of that "
                   "run), e.g. 'bf16/12/off/joint;bf16/24/on/split/autocast/channels_last=false'")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--ema", type=float, default=50.0, help="EMA half-life kimg (0 = off)")
    p.add_argument("--torch-profile", action="store_true",
                   help="profile one more iteration after the timed ones (one GPU): top ops and kernel kinds")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds for a sweep: a run still going then is stopped, later ones are not started; the "
                        "record is written either way")
    p.add_argument("--file", default=None, help="result file name (default throughput_<model>[_<options>]_<gpu>.json)")
    p.add_argument("--out", default=str(RESULTS))
    # A sweep's runs reuse its teacher, prompts and FLOP count.
    p.add_argument("--teacher", default=None, help=argparse.SUPPRESS)
    p.add_argument("--prompts", default=None, help=argparse.SUPPRESS)
    p.add_argument("--forward-tflop", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.torch_profile and args.gpus != 1:
        p.error("--torch-profile profiles the training process: one GPU only")
    runs = grid(args)
    if len(runs) == 1:
        single(args, runs[0])
    else:
        sweep(args, runs)


def _inputs(args) -> tuple[Path, str, str]:
    # (work dir, teacher, prompts): a sweep's, or built here.
    if args.teacher:
        return Path(args.out), args.teacher, args.prompts
    return synthetic_run(args.model, "sidflow-bench-")


def _tag() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return next((k.lower() for k in PEAK_BF16_TFLOPS if k in gpu), "cpu" if gpu == "cpu" else "gpu")


def single(args, run: dict) -> None:
    """Measure one run in this process (one GPU: the stage trains here) and record it."""
    from sidflow.config import override
    from sidflow.stages.distill import DistillConfig, launch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work, teacher, prompts = _inputs(args)
    mb = run["micro_batch"]
    batch = mb * args.rounds * args.gpus
    iterations = args.warmup + args.iters + (1 if args.torch_profile else 0)
    cfg = DistillConfig(teacher=teacher, prompts=prompts, output=str(work / f"run-{label(run).replace(' ', '-')}"),
                        kappa=args.kappa, batch=batch, micro_batch=mb, kimg=batch * iterations / 1000,
                        precision=run["precision"], grad_checkpointing=args.grad_checkpointing,
                        compile=run["compile"] == "on", generator_backward=run["generator_backward"],
                        norms=run["norms"], ema_halflife_kimg=args.ema, checkpoints=False, profile=True,
                        gpus=str(args.gpus), sharding=args.sharding, resume=False)
    cfg = override(cfg, run["set"])
    prof: dict = {}
    metrics = {"micro_batch": mb, "precision": run["precision"], "compile": run["compile"] == "on",
               "generator_backward": run["generator_backward"], "norms": run["norms"]}
    try:
        with profiled(args.warmup + args.iters, prof) if args.torch_profile else contextlib.nullcontext():
            launch(cfg)
    except RuntimeError as e:  # GPU memory exhausted: recorded, so that a sweep goes on
        if not oom(str(e)):
            raise
        metrics = {**metrics, "error": "oom"}
    else:
        metrics = {**measured(args, cfg, Path(cfg.output), device, teacher), **metrics}
        if args.torch_profile:
            metrics["torch_profile"] = prof or None
    name = f"throughput_{args.model.replace('-', '_')}" + "".join(
        s for s, on in (("_fp32", run["precision"] == "fp32"), ("_compile", run["compile"] == "on"),
                        ("_split", run["generator_backward"] == "split"), ("_norms", _autocast_norms(run))) if on)
    file = args.file or f"{name}_{_tag()}.json"
    config = {**vars(args), **run, "batch": batch, "weights": "random (published config, no download)"}
    record(name, file, args.gpus, metrics, config, Path(args.out))


def measured(args, cfg, run_dir: Path, device, teacher: str) -> dict:
    """Return the figures of a finished run from its metrics lines."""
    from sidflow.teacher import load_teacher

    lines = [json.loads(x) for x in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    warm, timed = lines[: args.warmup], lines[args.warmup: args.warmup + args.iters]
    ips = statistics.median(x["images_per_s"] for x in timed) / args.gpus
    phases = {k.removeprefix("phase_").removesuffix("_s"): statistics.median(x[k] for x in timed)
              for k in timed[0] if k.startswith("phase_")}
    fwd = args.forward_tflop if args.forward_tflop is not None else forward_tflop(load_teacher(teacher, device))
    tflops = ips * fwd * forward_equivalents(args.kappa, args.kappa, args.kappa)
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
    return {
        "images_per_s_per_gpu": round(ips, 3),
        "tflops_per_gpu": round(tflops, 1),
        "mfu": round(tflops / peak, 3) if peak else None,
        "peak_mem_gib": max(x.get("peak_mem_gib", 0) for x in timed) if device.type == "cuda" else None,  # rank 0
        # The first iteration's wall time holds the compile time when compile is on.
        "first_iteration_s": round(cfg.batch / lines[0]["images_per_s"], 2),
        "warmup_s": round(sum(cfg.batch / x["images_per_s"] for x in warm), 2),
        "phase_split": {k: round(v / sum(phases.values()), 3) for k, v in phases.items()},
        "phase_seconds": {k: round(v, 4) for k, v in phases.items()},
        "unet_forward_tflop_per_sample": float(f"{fwd:.4g}"),
        "iterations_timed": len(timed),
        "loss_g_last": timed[-1]["loss_g"],
        "loss_fake_last": timed[-1]["loss_fake"],
    }


def sweep(args, runs: list[dict]) -> None:
    """Measure each run as its own process (this script with one value per option) and record them all, with the
    bf16/fp32 ratios and each option's speed-up, after every run."""
    from sidflow.teacher import load_teacher

    work, teacher, prompts = _inputs(args)
    if args.forward_tflop is None:
        loaded = load_teacher(teacher, "cuda" if torch.cuda.is_available() else "cpu")
        args.forward_tflop = forward_tflop(loaded)
        del loaded
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the runs are other processes: leave them the GPU
    (work / "runs").mkdir(parents=True, exist_ok=True)
    keep = ["--model", args.model, "--gpus", str(args.gpus), "--sharding", args.sharding,
            "--rounds", str(args.rounds), "--iters", str(args.iters), "--warmup", str(args.warmup),
            "--kappa", str(args.kappa), "--ema", str(args.ema), "--teacher", teacher, "--prompts", prompts,
            "--forward-tflop", repr(args.forward_tflop),
            *(["--grad-checkpointing"] if args.grad_checkpointing else []),
            *(["--torch-profile"] if args.torch_profile else [])]
    done: list[dict] = []
    start = time.monotonic()
    for i, run in enumerate(runs):
        name = label(run).replace(" ", "-")
        out, log = work / "runs" / name, work / "runs" / f"{name}.log"
        cmd = [sys.executable, __file__, *keep, "--precision", run["precision"],
               "--micro-batch", str(run["micro_batch"]), "--compile", run["compile"],
               "--generator-backward", run["generator_backward"], "--norms", run["norms"],
               *(a for k, v in run["set"].items() for a in ("--set", f"{k}={v}")),
               "--out", str(out), "--file", "result.json"]
        left = None if args.time_limit is None else args.time_limit - (time.monotonic() - start)
        rc = None
        if left is None or left > 0:
            try:
                with open(log, "w") as f:
                    rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=left).returncode
            except subprocess.TimeoutExpired:  # killed: the record is still written, and final
                pass
        result = out / "result.json"
        if rc == 0 and result.exists():
            metrics = json.loads(result.read_text())["metrics"]
        elif rc is None:
            metrics = {"error": "not run: time limit" if not log.exists() else "stopped: time limit"}
        else:  # an OOM outside the training (loading) or a crash: the log says which
            text = log.read_text(errors="replace")
            metrics = {"error": "oom" if oom(text) else f"exit code {rc}", "log_tail": text.splitlines()[-5:]}
        done.append({"run": label(run), "setting": run, **metrics})
        print(f"throughput [{i + 1}/{len(runs)}] {label(run)}: "
              f"{metrics.get('error') or str(metrics['images_per_s_per_gpu']) + ' images/s/GPU'}", file=sys.stderr)
        _record_sweep(args, done, final=i == len(runs) - 1)


def _record_sweep(args, done: list[dict], final: bool) -> None:
    ok = [r for r in done if "error" not in r]
    ips = {r["run"]: r["images_per_s_per_gpu"] for r in ok}

    def key(r: dict, **change) -> str:  # the label of r's setting with some of it changed
        return label({**r["setting"], **change})

    # bf16 over fp32 at the same micro-batch, compile and backward (an fp32 run's norms are fp32 whatever asked).
    ratios = {r["run"].removeprefix("bf16 "): round(r["images_per_s_per_gpu"] / ips[key(r, precision="fp32")], 3)
              for r in ok if r["setting"]["precision"] == "bf16" and key(r, precision="fp32") in ips}
    plain = {"compile": "off", "generator_backward": "joint", "norms": "fp32", "set": {}}
    speedups = {r["run"]: round(r["images_per_s_per_gpu"] / ips[base], 3) for r in ok
                if (base := key(r, **plain)) in ips and base != r["run"]}
    best: dict[str, dict] = {}
    for r in ok:
        setting = key(r, micro_batch=0).replace(" mb0", "")
        if setting not in best or r["images_per_s_per_gpu"] > best[setting]["images_per_s_per_gpu"]:
            best[setting] = {"micro_batch": r["micro_batch"], "images_per_s_per_gpu": r["images_per_s_per_gpu"],
                             "peak_mem_gib": r["peak_mem_gib"]}
    metrics = {"runs": done, "bf16_over_fp32": ratios, "speedup_over_eager_joint": speedups,
               "best_micro_batch": best, "unet_forward_tflop_per_sample": float(f"{args.forward_tflop:.4g}")}
    name = f"throughput_{args.model.replace('-', '_')}_sweep"
    config = {k: v for k, v in vars(args).items() if k not in ("out", "teacher", "prompts", "forward_tflop")}
    record(name, args.file or f"{name}_{_tag()}.json", args.gpus, metrics,
           {**config, "weights": "random (published config, no download)"}, Path(args.out), final=final)


if __name__ == "__main__":
    main()
