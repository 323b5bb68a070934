"""One process per GPU: a stage asked for N GPUs runs as N `sidflow` processes under `torchrun --standalone`."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from sidflow.config import to_args


def gpu_count(gpus: str) -> int:
    """Return the process count for a `gpus` value: a positive count, or 'all' (every visible GPU, at least 1)."""
    if gpus == "all":
        import torch

        return max(torch.cuda.device_count(), 1)
    try:
        n = int(gpus)
    except ValueError:
        raise ValueError(f"gpus={gpus!r} must be a count or 'all'") from None
    if n < 1:
        raise ValueError(f"gpus={gpus!r} must be at least 1")
    return n


def in_launch() -> bool:
    """True inside a torchrun launch (every process of it has WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


RESULT_ENV = "SIDFLOW_RESULT_FILE"  # where rank 0 of a launch writes its result for the launching process
# Set by run_per_gpu: the launching process has validated the config, so its ranks do not fetch the teacher, read the
# prompts and probe the output again, N times over. The pipeline's TrainJob task sets it too (trainjob.manifest);
# ranks of a TrainJob applied by hand validate.
CHECKED_ENV = "SIDFLOW_CHECKED"


def checked() -> bool:
    """True in a rank whose launching process (run_per_gpu) already validated the config."""
    return in_launch() and os.environ.get(CHECKED_ENV) == "1"


def run_per_gpu(command: str, cfg, n: int) -> tuple[int, dict | None]:
    """Run `sidflow <command>` with cfg on n local processes; return (exit code, the result rank 0 reported).

    The processes share this process's terminal (live progress bars); SIGTERM and SIGINT reach them (torchrun
    forwards them), so a preempted pod still checkpoints.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m",
           "sidflow.cli", command, *to_args(cfg)]
    with tempfile.TemporaryDirectory(prefix="sidflow-launch-") as tmp:
        result = Path(tmp) / "result.json"
        proc = subprocess.Popen(cmd, env={**os.environ, RESULT_ENV: str(result), CHECKED_ENV: "1"})
        forward = lambda sig, _frame: proc.send_signal(sig)  # noqa: E731
        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)} if main_thread() else {}
        try:
            rc = proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return rc, json.loads(result.read_text()) if result.exists() else None


def report(result: dict) -> None:
    """Inside a launch, on rank 0: hand `result` to the launching process (nothing to do outside a launch)."""
    path = os.environ.get(RESULT_ENV)
    if path and os.environ.get("RANK", "0") == "0":
        Path(path).write_text(json.dumps(result))


def per_gpu(command: str, cfg, run, check, result_type, finished=lambda rc, result: rc == 0):
    """Run a stage on `cfg.gpus` GPUs and return its result: `run(cfg)` in this process for one GPU (or inside a
    torchrun launch, where rank 0 reports back), else `check(cfg, n)` and one `sidflow <command>` process per GPU.
    `finished(rc, result)` says whether the launch ended as the stage meant it to. The caller validates: its ranks
    then skip that (launch.checked)."""
    n = gpu_count(cfg.gpus)
    if n == 1 or in_launch():
        result = run(cfg)
        report(dataclasses.asdict(result))
        return result
    check(cfg, n)
    rc, result = run_per_gpu(command, cfg, n)
    if result is None or not finished(rc, result):
        raise RuntimeError(f"{command} on {n} processes failed (exit code {rc}); the lines above say why")
    return result_type(**result)


def prints_summary(gpus: str) -> bool:
    """Whether this process prints the stage's one summary line: the launching process, or a lone one."""
    return not in_launch() or (gpu_count(gpus) == 1 and os.environ.get("RANK", "0") == "0")


def main_thread() -> bool:
    """Signal handlers can only be installed from the main thread (kfp.local and tests call stages from others)."""
    import threading

    return threading.current_thread() is threading.main_thread()
