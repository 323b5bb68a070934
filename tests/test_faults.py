"""Nothing lost, nothing wrong crowned: kills at exact points, damaged and planted checkpoints, bad flags, torn inputs.

Every kill is SIGKILL at a named failpoint (sidflow.failpoints), as the OOM killer or a lost node would deliver it; the
run that follows must end with exactly the weights of an uninterrupted run, or refuse in one line.
"""

import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from sidflow import storage
from sidflow.cli import main
from sidflow.stages.distill import DistillConfig
from sidflow.train import checkpoint
from tests.test_distill import ENV, _cfg, _cli, prompts  # noqa: F401  (prompts is a fixture)

END = checkpoint.name_for(6)  # kimg 0.006 at batch 2: 3 iterations, a checkpoint after each


def _child(cfg: DistillConfig, failpoint: str | None = None, **env) -> subprocess.CompletedProcess:
    """Run `sidflow distill` in a child process, which SIGKILLs itself at `failpoint` if one is given."""
    extra = {"SIDFLOW_FAILPOINT": failpoint} if failpoint else {}
    return subprocess.run(_cli(cfg), env={**ENV, **extra, **env}, capture_output=True, text=True, timeout=600)


def _run(cfg: DistillConfig, **env) -> subprocess.CompletedProcess:
    """Run `sidflow distill` to its end in this process (no signal is involved: the imports are already paid for);
    return what the command would have returned and printed."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in (*env, "SIDFLOW_NO_BAR")}
    os.environ.update({**env, "SIDFLOW_NO_BAR": "1"})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(_cli(cfg)[3:])
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return subprocess.CompletedProcess(_cli(cfg), rc, out.getvalue(), err.getvalue())


def _unet(output: str | Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(output) / "model" / "unet" / "diffusion_pytorch_model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(tiny_teacher, prompts, tmp_path_factory):  # noqa: F811
    """An uninterrupted run through the CLI: (config, its stdout summary line)."""
    cfg = _cfg(tiny_teacher, prompts, tmp_path_factory.mktemp("straight") / "run")
    done = _run(cfg)
    assert done.returncode == 0, done.stderr[-3000:]
    return cfg, done.stdout.strip().splitlines()[-1]


def _like(straight, tmp_path, **kw) -> DistillConfig:
    from dataclasses import replace

    return replace(straight[0], output=str(tmp_path / "run"), **kw)


@pytest.mark.parametrize("failpoint", [
    "train:checkpoint@1",        # right after the first checkpoint is published
    "publish:file@1",            # mid-publish of the first checkpoint: a file up, no manifest
    "publish:before-manifest@2",  # the second checkpoint whole but for its manifest
    "train:export",              # the last checkpoint published, nothing exported (as SIGTERM in the last iteration)
    "publish:before-manifest@4",  # the export's files all written, its manifest not
])
def test_a_kill_anywhere_then_the_same_command_gives_the_uninterrupted_weights(straight, tmp_path, failpoint):
    cfg = _like(straight, tmp_path)
    killed = _child(cfg, failpoint)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert storage.read_manifest(str(tmp_path / "run" / "model")) is None  # nothing half-exported is visible
    again = _run(cfg)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _same(_unet(tmp_path / "run"), _unet(straight[0].output))
    assert _same(checkpoint.load(str(tmp_path / "run" / "checkpoints" / END))["G"]["model"],
                 checkpoint.load(str(Path(straight[0].output) / "checkpoints" / END))["G"]["model"])


def test_a_finished_run_rerun_is_a_no_op_that_prints_the_same_result(straight, tmp_path):
    cfg = _like(straight, tmp_path)
    shutil.copytree(straight[0].output, cfg.output)
    created = storage.read_manifest(storage.join(cfg.output, "model"))["created"]
    again = _run(cfg)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.strip().splitlines()[-1] == straight[1].replace(straight[0].output, cfg.output)
    assert storage.read_manifest(storage.join(cfg.output, "model"))["created"] == created  # not re-exported


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(straight, tmp_path):
    cfg = _like(straight, tmp_path)
    shutil.copytree(straight[0].output, cfg.output)
    shutil.rmtree(Path(cfg.output) / "model")
    state = Path(cfg.output) / "checkpoints" / END / "state.pt"
    state.write_bytes(state.read_bytes()[:-100] + b"\0" * 100)  # bit rot under an intact manifest
    again = _run(cfg)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "is corrupted" in again.stderr and "resuming from the checkpoint before it" in again.stderr
    assert _same(_unet(cfg.output), _unet(straight[0].output))


class _Payload:
    def __reduce__(self):  # what an attacker with write access to the output prefix would plant
        return (Path.write_text, (Path(os.environ["SIDFLOW_PWNED"]), "code ran"))


def test_a_planted_pickle_is_refused_not_run(straight, tmp_path):
    cfg = _like(straight, tmp_path)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    os.environ["SIDFLOW_PWNED"] = str(marker)
    try:
        (evil / "state.pt").write_bytes(pickle.dumps({"G": _Payload()}))
    finally:
        del os.environ["SIDFLOW_PWNED"]
    storage.publish_dir(str(evil), storage.join(cfg.output, "checkpoints", checkpoint.name_for(2)))
    with pytest.raises(checkpoint.UnsafeCheckpoint, match="is refused"):
        checkpoint.load(storage.join(cfg.output, "checkpoints", checkpoint.name_for(2)))
    run = _run(cfg, SIDFLOW_PWNED=str(marker))
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 2 and "Traceback" not in run.stderr and "is refused" in last, run.stderr[-2000:]
    assert not marker.exists()


def test_only_the_newest_checkpoints_are_kept(straight, tmp_path):
    cfg = _like(straight, tmp_path, keep_checkpoints=2)
    assert _run(cfg).returncode == 0
    assert [Path(u).name for u in checkpoint.complete(cfg.output)] == [END, checkpoint.name_for(4)]
    assert storage.listdir(storage.join(cfg.output, "checkpoints")) == [checkpoint.name_for(4), END]


def test_a_checkpoint_of_another_run_is_refused_and_a_longer_run_continues(straight, tmp_path):
    cfg = _like(straight, tmp_path)
    assert _child(cfg, "train:checkpoint@1").returncode == -9
    config = (Path(cfg.output) / "config.json").read_text()
    from sidflow.stages.distill import run

    for change, named in [(dict(kappa=2.0), "kappa: 1.5 -> 2.0"), (dict(batch=4), "batch: 2 -> 4"),
                          (dict(lr_g=1e-3), "lr_g: 0.0001 -> 0.001"), (dict(seed=3), "seed: 0 -> 3")]:
        with pytest.raises(ValueError, match="holds a checkpoint of another run") as info:
            run(_like(straight, tmp_path, **change))  # the CLI prints this one line and exits 2
        assert named in str(info.value) and "\n" not in str(info.value)
    assert (Path(cfg.output) / "config.json").read_text() == config  # not rewritten by a refused run
    longer = _run(_like(straight, tmp_path, kimg=0.008))
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert "resumed from" in longer.stderr + longer.stdout and checkpoint.latest(cfg.output).endswith(
        checkpoint.name_for(8))


def test_ctrl_c_checkpoints_like_sigterm_and_leaves_no_temp_logs(straight, tmp_path, monkeypatch):
    import signal
    import time

    cfg = _like(straight, tmp_path, kimg=0.016)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen(_cli(cfg), env={**ENV, "TMPDIR": str(tmp)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    first = Path(cfg.output) / "checkpoints" / checkpoint.name_for(2) / "manifest.json"
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 143 and "Traceback" not in out, out[-2000:]
    assert checkpoint.latest(cfg.output) is not None
    assert not list(tmp.glob("sidflow-logs-*"))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # TMPDIR as this process's tempfile reads it
    assert _run(cfg).returncode == 0
    assert not list(tmp.glob("sidflow-logs-*")) and list(Path(cfg.output, "logs").iterdir())


@pytest.mark.parametrize("flag, value, named", [
    ("--lr-g", "0", "lr_g=0.0"), ("--lr-fake", "-1e-4", "lr_fake=-0.0001"), ("--kimg", "nan", "kimg=nan"),
    ("--adam-beta2", "1.5", "adam_beta2=1.5"), ("--adam-beta1", "-0.1", "adam_beta1=-0.1"),
    ("--alpha", "nan", "alpha=nan"), ("--ema-halflife-kimg", "-1", "ema_halflife_kimg=-1.0"),
    ("--ema-rampup", "-0.5", "ema_rampup=-0.5"), ("--seed", "99999999999", "seed=99999999999"),
    ("--log-every", "0", "log_every=0"), ("--checkpoint-kimg", "0.0000001", "checkpoint_kimg=1e-07"),
    ("--keep-checkpoints", "0", "keep_checkpoints=0"), ("--adam-eps", "0", "adam_eps=0.0"),
])
def test_bad_flags_are_one_line_before_anything_loads_or_is_written(straight, tmp_path, capsys, flag, value, named):
    cfg = _like(straight, tmp_path)
    rc = main(["distill", *_cli(cfg)[4:], f"{flag}={value}", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and named in err, err
    assert not Path(cfg.output).exists()


def test_dry_run_creates_nothing(straight, tmp_path, capsys):
    cfg = _like(straight, tmp_path)
    assert main(["distill", *_cli(cfg)[4:], "--dry-run"]) == 0
    assert not Path(cfg.output).exists()


def test_teachers_that_cannot_work_are_one_line(straight, tiny_teacher, tmp_path, capsys):
    # An exported generator given as the teacher, and a teacher whose weights were cut short by a torn copy.
    for teacher, why in [(str(Path(straight[0].output) / "model"), "is a generator exported by sidflow"),
                         (str(tmp_path / "torn"), "are damaged or truncated")]:
        if teacher.endswith("torn"):
            shutil.copytree(tiny_teacher, teacher)
            weights = Path(teacher) / "unet" / "diffusion_pytorch_model.safetensors"
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        cfg = _like(straight, tmp_path, teacher=teacher)
        assert main(["distill", *_cli(cfg)[4:], "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and why in err, err


def test_a_torn_s3_teacher_is_not_published(tiny_teacher, s3_bucket, tmp_path):
    from sidflow.stages import download_teacher
    from sidflow.teacher import TeacherError

    src = s3_bucket + "/uploaded/sd"
    storage.upload_dir(tiny_teacher, src)  # by hand, no manifest, and one weights file lost on the way
    storage.delete_file(storage.join(src, "vae", "diffusion_pytorch_model.safetensors"))
    dest = s3_bucket + "/teachers/sd"
    with pytest.raises(TeacherError, match="vae has no weights"):
        download_teacher.run(download_teacher.DownloadTeacherConfig(source=src, dest=dest))
    assert storage.read_manifest(dest) is None and storage.list_files(dest) == []


def test_a_generator_without_its_manifest_or_with_other_weights_does_not_exist(straight, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(Path(straight[0].output) / "model", model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    args = ["generate", "--model", str(model), "--prompt", "a red cat", "--out", str(tmp_path / "x.png"),
            "--device", "cpu"]
    assert main(args) == 2
    assert "differs from the manifest" in capsys.readouterr().err
    (model / "manifest.json").unlink()
    assert main(args) == 2
    assert "has no manifest.json" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_a_reference_that_is_not_an_npz_is_refused_without_suggesting_pickles(tmp_path):
    from sidflow.evaluate.reference import read_reference

    for data in (b"mu,sigma\n1,2\n", pickle.dumps({"mu": 1})):
        (tmp_path / "ref.npz").write_bytes(data)
        with pytest.raises(ValueError, match="is not a `sidflow data ref-stats` .npz file") as info:
            read_reference(str(tmp_path / "ref.npz"))
        assert "pickle" not in str(info.value)



def test_the_distill_task_retries_a_crashed_launch_itself_and_resumes(straight, tmp_path, monkeypatch):
    # KFP backends drop set_retry inside a ParallelFor (kubeflow/pipelines #12389, #13897): the component re-launches
    # a crashed training itself. The first child is killed after its first checkpoint; the second resumes from it.
    from kfp import dsl

    from sidflow.kfp.components.distill import distill

    cfg = _like(straight, tmp_path)
    marker = tmp_path / "killed-once"
    monkeypatch.setenv("SIDFLOW_FAILPOINT", "train:checkpoint@1")
    monkeypatch.setenv("SIDFLOW_FAILPOINT_ONCE", str(marker))
    monkeypatch.setenv("SIDFLOW_NO_BAR", "1")
    fields = {k: v for k, v in __import__("dataclasses").asdict(cfg).items() if k != "keep_checkpoints"}
    uri = distill.python_func(metrics=dsl.Metrics(uri=str(tmp_path / "m")), model=dsl.Model(uri=str(tmp_path / "card")),
                              **{k: v for k, v in fields.items() if v is not None}, retries=1)
    assert marker.exists() and uri == storage.join(cfg.output, "model")
    assert _same(_unet(cfg.output), _unet(straight[0].output))
