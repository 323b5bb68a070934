"""The demo's terminal output: one line per stage, kfp.local's log in a file (the demo itself takes ~10 minutes on
a CPU; these run its output plumbing on tiny stand-ins)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidflow.demo import StageLog, logged, verdict


def _feed(lines):
    stages = StageLog()
    return [out for line in lines for out in stages.feed(line)] + stages.close()


def test_stage_lines_from_kfp_local_log_records():
    # The records kfp.local writes (task_dispatcher, logging_utils), colours included.
    cyan, green, reset = "\x1b[96m", "\x1b[92m", "\x1b[0m"
    log = [
        "10:00:00.000 - INFO - Running pipeline: \x1b[95m'sid-distill'\x1b[0m",
        f"10:00:01.000 - INFO - Executing task {cyan}'download-teacher'{reset}",
        "10:00:01.010 - INFO - Streamed logs:", "", "    teacher t -> /a/teachers/t (sha256:1, skipped=False)",
        f"10:00:03.500 - INFO - Task {cyan}'download-teacher'{reset} finished with status {green}SUCCESS{reset}",
        f"10:00:03.501 - INFO - Task {cyan}'download-teacher'{reset} outputs:",
        "    fingerprint: 'sha256:1'", "    skipped: False", "    uri: '/a/teachers/t'",
        "-" * 80,
        f"10:00:04.000 - INFO - Executing task {cyan}'distill'{reset}",
        f"10:01:04.250 - INFO - Task {cyan}'distill'{reset} finished with status {green}SUCCESS{reset}",
        f"10:01:04.251 - INFO - Task {cyan}'distill'{reset} outputs:",
        "    Output: '/a/runs/r/t/model'",
        "    metrics: Metrics( name='metrics',", "                      uri='/k/distill/metrics',",
        "                      metadata={'kimg': 3.2} )",
        "    model: Model( name='model',", "                  uri='/k/distill/model',",
        "                  metadata={} )",
        "-" * 80,
        f"10:01:04.500 - INFO - Executing task {cyan}'watch-teachers'{reset}",
        f"10:01:04.900 - INFO - Task {cyan}'watch-teachers'{reset} finished with status {green}SUCCESS{reset}",
        f"10:01:04.901 - INFO - Task {cyan}'watch-teachers'{reset} outputs:",
        "    Output: [{'source': '/t/a', 'dest': '/d/a'}, {'source': '/t/b', 'dest': '/d/b'}]",
        "-" * 80,
        f"10:01:05.000 - INFO - Executing task {cyan}'report'{reset}",
        f"10:01:05.500 - INFO - Task {cyan}'report'{reset} finished with status {green}SUCCESS{reset}",
        f"10:01:05.501 - INFO - Task {cyan}'report'{reset} has no outputs",
        "10:01:06.000 - INFO - Skipping conditional task 'register' (condition is false)",
    ]
    lines = _feed(log)
    assert [line.split()[:3] for line in lines] == [
        ["download-teacher", "2.5", "s"], ["distill", "60.2", "s"], ["watch-teachers", "0.4", "s"],
        ["report", "0.5", "s"],
        ["register", "skipped", "(condition"]]
    assert lines[0].endswith("/a/teachers/t") and lines[1].endswith("/a/runs/r/t/model")
    assert lines[2].endswith(" 2 items: /t/a, /t/b")


def test_logged_sends_subprocess_and_in_process_output_to_the_file(tmp_path, capfd):
    log = tmp_path / "out" / "pipeline.log"
    with logged(log):
        print("in-process chatter", flush=True)
        subprocess.run([sys.executable, "-c", "import sys; print('child stdout'); print('child err', file=sys.stderr)"],
                       check=True)
        print("12:00:00.000 - INFO - Executing task 'evaluate'\n"
              "12:00:07.000 - INFO - Task 'evaluate' finished with status SUCCESS\n"
              "12:00:07.001 - INFO - Task 'evaluate' outputs:\n    Output: '/r/eval/metrics.json'\n" + "-" * 40,
              flush=True)
    print("after the block")
    out, err = capfd.readouterr()
    assert out.splitlines() == ["  evaluate                         7.0 s  /r/eval/metrics.json", "after the block"]
    assert err == ""
    text = log.read_text()
    assert "in-process chatter" in text and "child stdout" in text and "child err" in text


def test_logged_shows_the_end_of_the_log_when_the_block_fails(tmp_path, capfd):
    log = tmp_path / "pipeline.log"
    with pytest.raises(RuntimeError, match="task failed"):
        with logged(log):
            for i in range(100):
                print(f"line {i}")
            os.system(f"{sys.executable} -c \"print('Traceback: the real error')\"")
            raise RuntimeError("task failed")
    out, err = capfd.readouterr()
    assert out == ""
    assert "line 71" in err and "line 70" not in err and "Traceback: the real error" in err
    assert str(log) in err.splitlines()[-1]


def test_a_real_kfp_local_run_prints_one_line_per_task(tmp_path, capfd):
    # Two lightweight components under kfp.local's SubprocessRunner, as run_local runs the demo's pipeline.
    from kfp import dsl, local

    @dsl.component
    def shout(word: str) -> str:
        print("chatter from the task process " * 5)
        return word.upper()

    @dsl.component
    def write(text: str, out: dsl.Output[dsl.Artifact]):
        with open(out.path, "w") as f:
            f.write(text)

    @dsl.pipeline
    def tiny(word: str = "hi"):
        write(text=shout(word=word).output)

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"),
               raise_on_error=True)
    with logged(tmp_path / "pipeline.log"):
        tiny()
    out, err = capfd.readouterr()
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == ["shout", "write"], out
    assert lines[0].endswith(" HI") and lines[1].endswith("/write/out") and " s  " in lines[1]
    assert err == "" and "chatter from the task process" in (tmp_path / "pipeline.log").read_text()


def test_the_grid_printed_is_the_one_the_evaluate_task_wrote(tmp_path):
    from sidflow.demo import newest_grid

    assert newest_grid(tmp_path) is None
    old, new = (tmp_path / "artifacts" / "runs" / r / "toy-teacher-ab12" / "eval" / "grid.png" for r in ("1", "2"))
    for path, mtime in ((old, 1000), (new, 2000)):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"png")
        os.utime(path, (mtime, mtime))
    assert newest_grid(tmp_path) == new


def test_demo_verdict_compares_the_distilled_row_with_the_teachers_steps():
    one, many = {"fid": 800.0, "clip": 0.39}, {"fid": 400.0, "clip": 0.6}
    assert verdict(one, many, {"fid": 600.0, "clip": 0.5}) == (
        "distilled one step beats the teacher's single step: shapes-FID 0.75× its 1 step's and "
        "1.50× its 25 steps'; prompt accuracy +0.110 and -0.100")
    # better FID, worse accuracy: not a win
    assert verdict(one, many, {"fid": 600.0, "clip": 0.3}).startswith("distilled one step does not yet beat")


def test_the_comparison_sets_the_three_grids_side_by_side_under_their_labels(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from sidflow.demo import write_comparison

    def grid(path: Path, value: int, size: tuple[int, int]) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
        return path

    grid(tmp_path / "eval-teacher-1" / "grid.png", 10, (40, 30))
    grid(tmp_path / "eval-teacher-25" / "grid.png", 250, (40, 30))
    ours = grid(tmp_path / "artifacts" / "grid.png", 128, (50, 20))
    out = Image.open(io.BytesIO(write_comparison(tmp_path, ours, 2.0).read_bytes())).convert("RGB")
    assert out.size == (40 + 50 + 40 + 2 * 12, 20 + 30)  # three panels and two gaps; a label band above
    a = np.asarray(out)
    # left to right: the teacher's single step, the distilled model, the teacher's 25 steps
    assert [a[25, x].tolist() for x in (5, 60, 120)] == [[10] * 3, [128] * 3, [250] * 3]
    assert a[:20].min() == 0  # each label is drawn in black above its panel
