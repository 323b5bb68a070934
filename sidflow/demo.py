"""`make demo`: the whole sid-distill pipeline under kfp.local on the bundled toy teacher, then the before/after table.

watch_teachers → download_teacher → distill (real SiD-LSG iterations on the CPU) → evaluate (shapes-FID and prompt
accuracy with the bundled evaluator) → register (champion if it passes the gate). The teacher rows go through the
same evaluate stage (DDIM, CFG κ) with the same prompts, seeds and reference, and so does the one-step generator
as distillation starts (the teacher's weights at t_init), so the table shows what distillation changed. Every
number printed is measured in this run; the pipeline's evaluate task shows the teacher's 25-step row beside the
distilled model's on its run page. A second demo in the same directory finds the teacher already registered:
watch_teachers skips it.

The terminal gets one line per pipeline stage (name, seconds, what it produced), the table and comparison.png's path;
kfp.local's own log (each task's streamed output, its executor inputs and outputs) goes to <out>/pipeline.log, whose
last lines are printed when a stage fails.
"""

import contextlib
import json
import os
import re
import sys
import threading
import time
from pathlib import Path

TOY_TEACHER = Path(__file__).resolve().parent.parent / "examples" / "toy-teacher"
MODEL_NAME = "toy-sid"


# The demo's recipe for 100 iterations of batch 32 (3.2 kimg) on a CPU: the generator starts from the teacher fed at
# t = 900, not SD's 625, and G learns at half the fake network's rate. At 625 and lr 1e-5 the result after 100
# iterations was chaotic in the seed (FID 991 to 3118, against 791 for the teacher's one DDIM step); the later start
# begins near that single step, and the slower G kept the run that diverged at lr 1e-5 below it (docs/benchmarks.md,
# "The demo's recipe").
DEMO_T_INIT = 900
DEMO_LR_G, DEMO_LR_FAKE = 5e-6, 1e-5


def demo_parameters(root: Path, kimg: float, kappa: float, eval_set: dict) -> dict:
    """sid-distill parameters for a CPU run on the toy teacher (everything else at the pipeline's defaults)."""
    evaluator = str(TOY_TEACHER / "evaluator")
    return {"teachers": str(TOY_TEACHER), "registry": str(root / "registry"), "model_name": MODEL_NAME,
            "artifact_root": str(root / "artifacts"), "prompts": str(root / "prompts.txt"), "kappa": kappa,
            "t_init": DEMO_T_INIT,
            "batch": 32, "micro_batch": 32, "kimg": kimg, "checkpoint_kimg": kimg / 2, "precision": "fp32",
            "lr_g": DEMO_LR_G, "lr_fake": DEMO_LR_FAKE, "ema_halflife_kimg": 0.5, "ema_rampup": 0.5,
            "eval_prompts": eval_set["prompts"], "eval_reference": eval_set["reference"], "eval_protocol": "native",
            "eval_features": f"toy:{evaluator}", "eval_scorer": f"toy:{evaluator}", "eval_batch": 128}


# kfp.local's log records: "12:03:04.567 - INFO - message" (its colours stripped), then untimed continuation lines.
_RECORD = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d+) - (\w+) - (.*)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TASK = r"'([^']+)'"


class StageLog:
    """Turn kfp.local's log, fed line by line, into one line per finished stage: name, seconds, its output."""

    def __init__(self):
        self.started: dict[str, float] = {}
        self.pending: tuple[str, float, str] | None = None  # finished, its outputs still being read
        self.outputs: list[str] = []

    def feed(self, line: str) -> list[str]:
        """Return the stage lines `line` completes."""
        line = _ANSI.sub("", line.rstrip("\n"))
        record = _RECORD.match(line)
        if not record:  # a continuation: an output of the pending stage, or the rule that ends its block
            text = line.strip()
            if self.pending is None or not text:
                return []
            if set(text) <= {"-"}:
                return self._emit()
            self.outputs.append(text)
            return []
        h, m, sec, ms, _level, msg = record.groups()
        t = int(h) * 3600 + int(m) * 60 + int(sec) + int(ms) / 10 ** len(ms)
        if self.pending and msg == f"Task '{self.pending[0]}' outputs:":
            return []  # the outputs follow on continuation lines
        out = self._emit() if self.pending else []  # any other record ends the pending stage's block
        if found := re.match(rf"Executing task {_TASK}", msg):
            self.started[found[1]] = t
        elif found := re.match(rf"Task {_TASK} finished with status (\w+)", msg):
            seconds = (t - self.started.get(found[1], t)) % 86400  # a run past midnight
            self.pending = (found[1], seconds, "" if found[2] == "SUCCESS" else found[2])
            self.outputs = []
        elif found := re.match(rf"Task {_TASK} cache hit", msg):
            out.append(f"  {found[1]:<28}  cached")
        elif found := re.match(rf"Skipping (?:conditional )?task {_TASK}\s*(.*)", msg):
            out.append(f"  {found[1]:<28}  skipped {found[2]}".rstrip())
        return out

    def close(self) -> list[str]:
        """Return the line of a stage still waiting for its outputs."""
        return self._emit() if self.pending else []

    def _emit(self) -> list[str]:
        name, seconds, failed = self.pending
        self.pending = None
        return [f"  {name:<28} {seconds:7.1f} s  {failed or _produced(self.outputs)}"]


def _produced(lines: list[str]) -> str:
    # What a stage produced, from kfp.local's "Task ... outputs:" block: its returned value (a URI for distill,
    # evaluate, download), else its first non-metrics artifact's URI, else its first output.
    values = {}
    for i, line in enumerate(lines):
        if found := re.match(r"(\w+): (.*)$", line):
            key, value = found.groups()
            if (artifact := re.match(r"(\w+)\( name=", value)) and i + 1 < len(lines):
                uri = re.match(r"uri='(.*)',$", lines[i + 1])
                if artifact[1] in ("Metrics", "ClassificationMetrics"):
                    continue
                value = uri[1] if uri else value
            values.setdefault(key, value.strip("'"))
    here = os.getcwd() + os.sep
    for key in ("Output", "uri", *values):
        if key in values:
            value = _brief(values[key]).replace(here, "")  # paths under the working directory (demo-out/...)
            text = value if key in ("Output", "uri") else f"{key}: {value}"
            return text if len(text) <= 100 else "..." + text[-97:]  # a path's end says the most
    return ""


def _brief(value: str) -> str:
    # A list output (the watch's new teachers) by count and first fields; a dict (register's) as key=value pairs.
    import ast

    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value
    if isinstance(parsed, list):
        first = [next(iter(v.values()), "") if isinstance(v, dict) and v else v for v in parsed]
        return f"{len(parsed)} item{'s' if len(parsed) != 1 else ''}" + (f": {', '.join(map(str, first))}"
                                                                          if first else "")
    if isinstance(parsed, dict):
        return ", ".join(f"{k}={v}" for k, v in parsed.items())
    return value


@contextlib.contextmanager
def logged(path: Path):
    """Send this process's stdout and stderr (file descriptors: the task processes kfp.local starts inherit them)
    to `path` while the block runs, and print each stage's line on the terminal as it finishes. On an error, print
    the log's last 30 lines and its path, then re-raise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    done = threading.Event()
    streams = sys.stdout, sys.stderr
    with open(path, "a", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log  # where sys.stdout is not fd 1 (a notebook, pytest's capture)
        follower = threading.Thread(target=_follow, args=(path, log.tell(), done, terminal), daemon=True)
        follower.start()
        try:
            yield terminal
        except BaseException:
            _restore(saved, streams, done, follower)
            tail = path.read_text(errors="replace").splitlines()[-30:]
            print("\n".join(_ANSI.sub("", line) for line in tail), file=sys.stderr)
            print(f"sidflow demo: failed; the full log is {path}", file=sys.stderr)
            raise
        else:
            _restore(saved, streams, done, follower)
        finally:
            terminal.close()


def _restore(saved: tuple[int, int], streams: tuple, done: threading.Event, follower: threading.Thread) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    done.set()
    follower.join()
    sys.stdout, sys.stderr = streams
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
    for fd in saved:
        os.close(fd)


def _follow(path: Path, offset: int, done: threading.Event, terminal) -> None:
    # Read the log as it grows and print each stage's line on the terminal when it finishes.
    stages, partial = StageLog(), ""
    with open(path, errors="replace") as f:
        f.seek(offset)
        while True:
            finished = done.is_set()  # read once more after the block ends: its last lines
            chunk = f.read()
            lines = (partial + chunk).split("\n")
            partial = lines.pop()
            if finished:
                lines += [partial]
            # write, not print: kfp.local swaps builtins.print for an indenting one while a task runs
            terminal.write("".join(out + "\n" for line in lines for out in stages.feed(line)))
            if finished:
                terminal.write("".join(out + "\n" for out in stages.close()))
                return
            time.sleep(0.2)


def newest_grid(root: Path) -> Path | None:
    """Return the newest grid.png the pipeline's evaluate task wrote (<artifact_root>/runs/<run>/<teacher>/eval/)."""
    grids = sorted((root / "artifacts" / "runs").glob("*/*/eval/grid.png"), key=os.path.getmtime)
    return grids[-1] if grids else None


def teacher_eval(root: Path, steps: int) -> Path:
    """Where the demo evaluates the teacher at `steps` DDIM steps (metrics.json, grid.png)."""
    return root / f"eval-teacher-{steps}"


def write_comparison(root: Path, grid: Path, kappa: float) -> Path:
    """Write <root>/comparison.png: the teacher's 1-step grid, the distilled model's and the teacher's 25-step grid
    side by side (the evaluate stage wrote each for the same prompts and seeds); return its path."""
    from sidflow.evaluate.report import side_by_side

    panels = [(f"teacher, 1 DDIM step, CFG {kappa:g}", teacher_eval(root, 1) / "grid.png"),
              (f"sidflow: distilled, ONE step, kappa {kappa:g}", grid),
              (f"teacher, 25 DDIM steps, CFG {kappa:g}", teacher_eval(root, 25) / "grid.png")]
    out = root / "comparison.png"
    out.write_bytes(side_by_side([(label, path.read_bytes()) for label, path in panels]))
    return out


def export_start(uri: str, kappa: float, t_init: int) -> str:
    """Publish the one-step generator as distillation starts (the teacher's UNet fed at t_init) at `uri`, so the
    evaluate stage scores the starting point like the distilled model."""
    from sidflow.generator import export_generator, generator_info
    from sidflow.stages.distill import DistillConfig
    from sidflow.teacher import load_teacher

    cfg = DistillConfig(teacher=str(TOY_TEACHER), kappa=kappa, t_init=t_init)  # as the demo's pipeline run has
    teacher = load_teacher(cfg.teacher)
    export_generator(teacher.unet, teacher, uri, generator_info(cfg, 0, "teacher", {}))
    return uri


def verdict(one: dict, many: dict, ours: dict) -> str:
    """One line on the table: the distilled one-step metrics `ours` against the teacher's 1 and 25 DDIM steps."""
    beats = ours["fid"] < one["fid"] and ours["clip"] > one["clip"]
    return (f"distilled one step {'beats' if beats else 'does not yet beat'} the teacher's single step: shapes-FID "
            f"{ours['fid'] / one['fid']:.2f}× its 1 step's and {ours['fid'] / many['fid']:.2f}× its 25 steps'; prompt "
            f"accuracy {ours['clip'] - one['clip']:+.3f} and {ours['clip'] - many['clip']:+.3f}")


def run_demo(out: str, kimg: float = 3.2, n: int = 256, kappa: float = 2.0) -> dict | None:
    """Run the demo under `out`; print the table and the grid path; return {"rows": {name: metrics}, "champion",
    "model"}, or None if the pipeline registered no champion."""
    import warnings

    from sidflow import registry
    from sidflow.kfp.compile import run_local
    from sidflow.stages import evaluate
    from sidflow.toy import shapes
    from sidflow.toy.metrics import toy_eval_set

    # kfp.local warns that pod settings (GPUs, images, display names) do not apply on this machine: expected here.
    warnings.filterwarnings("ignore", module=r"kfp\..*")
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SIDFLOW_CACHE", str(root / "cache"))
    os.environ.setdefault("SIDFLOW_NO_BAR", "1")  # kfp.local interleaves the tasks' output: bars would garble it
    (root / "prompts.txt").write_text("\n".join(sorted({shapes.caption(*c) for c in shapes.combos("train")})))
    evaluator = str(TOY_TEACHER / "evaluator")
    eval_set = toy_eval_set(str(root / "eval-set"), evaluator, n=n)
    reg = str(root / "registry")
    before = registry.champion(reg, MODEL_NAME)
    log = root / "pipeline.log"
    log.write_text("")  # this run's log only: a failure's tail is this run's
    # The teacher and the generator's start first, so the pipeline's evaluate task can put the teacher's 25-step row
    # (its metrics and samples for the same prompts and seeds) beside the distilled model's on the run page.
    print("[1/3] the teacher (1 and 25 DDIM steps) and the generator's starting point through the evaluate stage "
          f"(same prompts, seeds, reference); full log: {log}", flush=True)
    common = {"prompts": eval_set["prompts"], "reference": eval_set["reference"], "protocol": "native",
              "features": f"toy:{evaluator}", "scorer": f"toy:{evaluator}", "batch": 128}
    rows, teacher = {}, {}
    with logged(log):  # the evaluate stage's own output, as in the pipeline's task
        for steps in (1, 25):
            result = evaluate.run(evaluate.EvaluateConfig(
                model=str(TOY_TEACHER), sampler="ddim", teacher_steps=steps, kappa=kappa,
                output=str(teacher_eval(root, steps)), **common))
            teacher[steps] = result.metrics
            rows[f"teacher, {steps} DDIM step{'s' if steps > 1 else ''}, CFG {kappa:g}"] = result.metrics
        start_uri = export_start(str(root / "generator-start"), kappa, DEMO_T_INIT)
        start = evaluate.run(evaluate.EvaluateConfig(model=start_uri, output=str(root / "eval-generator-start"),
                                                     **common))
    params = demo_parameters(root, kimg, kappa, eval_set) | {"eval_teacher_row": str(teacher_eval(root, 25))}
    print(f"[2/3] sid-distill under kfp.local: artifacts in {root / 'artifacts'}, registry {reg}", flush=True)
    t0 = time.time()
    try:
        with logged(log):
            run_local(str(root / "kfp-root"), **params)
    except RuntimeError as e:  # a task failed: logged() printed the log's end
        print(f"sidflow demo: {_ANSI.sub('', str(e))}", file=sys.stderr)
        return None
    print(f"      pipeline done in {time.time() - t0:.0f} s")
    champion = registry.champion(reg, MODEL_NAME)
    if champion is None:
        print(f"the pipeline registered no champion: see {log}")
        return None
    if before is not None and before.version == champion.version:
        print(f"      teacher already distilled (registry v{champion.version}); delete {root} to distill again")
    print(f"[3/3] registry: {MODEL_NAME} v{champion.version} is champion: {champion.model_uri}")
    rows["one-step generator before distillation"] = start.metrics
    rows[f"distilled SiD-LSG, one step, κ {kappa:g}"] = champion.metrics
    print(f"\n| sampler | shapes-FID ↓ | prompt accuracy ↑ |   ({n} prompts, same seeds)\n|---|---|---|")
    for name, m in rows.items():
        print(f"| {name} | {m['fid']:.1f} | {m['clip']:.3f} |")
    print("\n" + verdict(teacher[1], teacher[25], champion.metrics))
    grid = newest_grid(root)
    if grid:
        comparison = write_comparison(root, grid, kappa)
        print(f"\nsamples, captioned, same prompts and seeds: {comparison} (teacher 1 step | distilled one step | "
              f"teacher 25 steps; the distilled grid alone: {grid})")
    print(json.dumps({"champion": champion.version, "model": champion.model_uri}))
    return {"rows": rows, "champion": champion.version, "model": champion.model_uri}
