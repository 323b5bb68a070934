"""One process per GPU: a stage asked for N GPUs runs as N `sidflow` processes under `torchrun --standalone`."""

import dataclasses
import json
import os
import signal
import subprocess
import sys


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


def cli_args(cfg) -> list[str]:
    """Return the `--field value` flags that reproduce a config on the sidflow command line (None fields omitted)."""
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None:
            continue
        text = str(value).lower() if isinstance(value, bool) else json.dumps(value) if isinstance(
            value, (dict, list)) else str(value)
        out += ["--" + f.name.replace("_", "-"), text]
    return out


def run_per_gpu(command: str, cfg, n: int) -> tuple[int, list[str]]:
    """Run `sidflow <command>` with cfg on n local processes; stream their output; return (exit code, its lines).

    SIGTERM and SIGINT reach the processes (torchrun forwards them), so a preempted pod still checkpoints.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m",
           "sidflow.cli", command, *cli_args(cfg)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    forward = lambda sig, _frame: proc.send_signal(sig)  # noqa: E731
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)} if _main_thread() else {}
    lines = []
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            lines.append(line.rstrip("\n"))
        return proc.wait(), lines
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
