"""`make demo` measured: wall time of the whole pipeline under kfp.local on this machine's CPU, and its table.

Runs `sidflow.demo.run_demo` in a fresh directory (so the teacher is distilled, not skipped) and records the
seconds it took, the shapes-FID / prompt accuracy of each row it printed and the number of lines it printed; its
comparison.png (teacher 1 step | distilled one step | teacher 25 steps, captioned) becomes demo_comparison.png.

  python benchmarks/demo_cpu.py            # writes benchmarks/results/demo_cpu.json
"""

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import RESULTS, record  # noqa: E402


class _Counting(io.TextIOBase):
    """Pass text through to `out`, counting the lines the demo prints (what a user's terminal shows)."""

    def __init__(self, out):
        self.out, self.lines = out, 0

    def write(self, text: str) -> int:
        self.lines += text.count("\n")
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kimg", type=float, default=3.2, help="the demo's training length (its default)")
    p.add_argument("--n", type=int, default=256, help="prompts scored per row (the demo's default)")
    p.add_argument("--file", default="demo_cpu.json")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()

    import torch

    from sidflow.demo import run_demo

    work = tempfile.mkdtemp(prefix="sidflow-demo-bench-")
    start = time.time()
    tee = _Counting(sys.stdout)
    with contextlib.redirect_stdout(tee):
        result = run_demo(work, kimg=args.kimg, n=args.n)
    seconds = time.time() - start
    if result is None:
        raise SystemExit("the demo registered no champion")
    rows = {name: {"shapes_fid": round(m["fid"], 3), "prompt_acc": round(m["clip"], 4)}
            for name, m in result["rows"].items()}
    metrics = {"seconds": round(seconds, 1), "minutes": round(seconds / 60, 2), "rows": rows,
               "lines_printed": tee.lines, "cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    record("demo_cpu", args.file, 0, metrics, vars(args), Path(args.out))
    picture = Path(work) / "comparison.png"  # the README's picture: teacher 1 step | distilled | teacher 25 steps
    if picture.exists():
        (Path(args.out) / "demo_comparison.png").write_bytes(picture.read_bytes())


if __name__ == "__main__":
    main()
