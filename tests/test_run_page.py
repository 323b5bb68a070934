"""What a run shows in the Kubeflow UI: the evaluate task's HTML page and the training tasks' Metrics artifact."""

import json

from kfp import dsl

from sidflow import storage
from sidflow.kfp import tasks
from sidflow.stages.evaluate import EvaluateConfig, EvaluateResult

TOY = EvaluateConfig(model="/a/runs/r/t/model", prompts="/e/prompts.parquet", reference="/e/ref.npz",
                     output="/a/runs/r/t/eval", protocol="native", features="toy:/ev", scorer="toy:/ev")
METRICS = {"fid": 1471.654, "clip": 0.5312, "images": 256, "images_per_s": 41.3}
INFO = {"teacher": "/examples/toy-teacher", "nimg": 3200, "steps": 1, "weights": "ema",
        "config": {"guidance": "lsg", "kappa": 2.0, "steps": 1}}


def test_the_page_names_the_model_its_recipe_and_the_metrics_by_protocol():
    page = tasks.run_page(TOY, METRICS, INFO, "toy-sid", b"\x89PNG fake")
    assert "<h2>toy-sid</h2>" in page
    assert "SiD-LSG: guidance lsg, κ 2, K = 1 step, 3.2 kimg (ema weights)" in page
    assert "teacher: <code>/examples/toy-teacher</code>" in page
    assert "<th>shapes-FID</th><td>1471.654</td>" in page and "<th>prompt accuracy</th><td>0.5312</td>" in page
    assert "FID (" not in page and "CLIP" not in page and "score 0.5312" not in page
    assert 'src="data:image/png;base64,iVBORyBmYWtl"' in page  # the grid, inline


def test_the_teachers_grid_stands_beside_the_models_with_its_sampler():
    teacher = {"teacher": "/examples/toy-teacher", "sampler": "ddim", "steps": 25, "kappa": 2.0}
    page = tasks.run_page(TOY, {**METRICS, "teacher_grid": teacher}, INFO, "toy-sid", b"\x89PNG model",
                          b"\x89PNG teacher")
    assert "<th>this model</th><th>its teacher: ddim 25 steps, CFG κ 2, same prompts and seeds</th>" in page
    model_at, teacher_at = page.index("iVBORyBtb2RlbA=="), page.index("iVBORyB0ZWFjaGVy")  # base64 of both PNGs
    assert model_at < teacher_at  # the model's grid first, in the left column
    # No teacher grid (grid = 0, teacher_grid off, or a teacher that did not load): the model's grid alone.
    alone = tasks.run_page(TOY, {**METRICS, "teacher_grid": None}, INFO, "toy-sid", b"\x89PNG model", None)
    assert "its teacher" not in alone and "iVBORyBtb2RlbA==" in alone


def test_a_teacher_row_gives_the_metrics_table_a_column_of_its_own():
    row = {"model": "/t", "sampler": {"kind": "teacher", "sampler": "ddim", "steps": 25, "kappa": 2.0},
           "fid": 217.345, "clip": 0.6431, "images": 256}
    page = tasks.run_page(TOY, {**METRICS, "teacher_row": row}, INFO, "toy-sid", None)
    assert "<tr><th></th><th>this model</th><th>its teacher: ddim 25 steps, CFG κ 2</th></tr>" in page
    assert "<tr><th>shapes-FID</th><td>1471.654</td><td>217.345</td></tr>" in page
    assert "<tr><th>prompt accuracy</th><td>0.5312</td><td>0.6431</td></tr>" in page
    assert "<tr><th>images</th><td>256</td><td>256</td></tr>" in page


def test_the_page_of_a_coco_run_says_fid_and_clip_score():
    cfg = EvaluateConfig(model="s3://b/m", prompts="s3://b/coco30k.parquet", reference="s3://b/ref.npz", output="o")
    info = {**INFO, "steps": 4, "nimg": 100_000, "config": {"guidance": "zero_cfg", "kappa": 1.5, "data": "s3://p"}}
    page = tasks.run_page(cfg, METRICS, info, "", None)
    assert "<h2>sidflow model</h2>" in page and "no grid (grid = 0)" in page
    assert "few-step SiD + adversarial finetune: guidance zero_cfg, κ 1.5, K = 4 steps, 100 kimg" in page
    assert "<th>FID (coco30k, clean-fid Inception)</th>" in page and "<th>CLIP score (ViT-g-14)</th>" in page


def test_a_sidflow_json_without_a_recipe_still_gives_a_page():
    page = tasks.run_page(TOY, METRICS, {"nimg": 512, "steps": 1, "config": {}}, "toy", None)
    assert "SiD-LSG: K = 1 step, 0.512 kimg</p>" in page and "teacher: <code></code>" in page


def test_a_teacher_row_names_its_sampler_and_escapes_what_it_prints():
    cfg = EvaluateConfig(model="/t/<sd15>", prompts="p", reference="r", output="o", sampler="ddim", teacher_steps=25,
                         kappa=3.0)
    page = tasks.run_page(cfg, METRICS, None, "a<b", None)
    assert "teacher, ddim 25 steps, CFG κ 3" in page and "/t/&lt;sd15&gt;" in page and "<h2>a&lt;b</h2>" in page


def test_the_evaluate_task_writes_the_page_from_the_models_sidflow_json_and_grid(tmp_path, monkeypatch):
    from sidflow.stages import evaluate as stage

    model, out = tmp_path / "model", tmp_path / "eval"
    model.mkdir()
    (model / "sidflow.json").write_text(json.dumps(INFO))
    out.mkdir()
    (out / "grid.png").write_bytes(b"\x89PNG fake")

    def launch(cfg):  # the stage's work is tested in test_evaluate.py; here what the task makes of its result
        storage.write_text(storage.join(cfg.output, "metrics.json"), json.dumps(METRICS))
        return EvaluateResult(storage.join(cfg.output, "metrics.json"), METRICS["fid"], METRICS["clip"], 256,
                              METRICS)

    monkeypatch.setattr(stage, "launch", launch)
    metrics, samples = dsl.Metrics(uri=str(tmp_path / "m")), dsl.HTML(uri=str(tmp_path / "page.html"))
    fields = {"model": str(model), "prompts": "p", "reference": "r", "output": str(out), "protocol": "native",
              "features": "toy:/ev", "scorer": "toy:/ev"}
    uri = tasks.evaluate(metrics, samples, "", "", "", {}, model_name="toy-sid", **fields)
    assert uri == str(out / "metrics.json")
    page = (tmp_path / "page.html").read_text()
    assert "<h2>toy-sid</h2>" in page and "K = 1 step, 3.2 kimg" in page and "iVBORyBmYWtl" in page
    assert metrics.metadata == {"fid": 1471.654, "clip": 0.5312, "images": 256.0, "images_per_s": 41.3}


def test_training_metrics_carry_rate_length_and_final_losses():
    last = {"kimg": 3.2, "iteration": 100, "loss_fake": 0.5, "loss_g": -0.25, "nan_dropped": 0,
            "images_per_s": 12.5, "loss_disc": 0.7, "loss_adv": 0.1, "peak_mem_gib": 3.1}
    got = tasks.train_metrics(3.2, 100, last)
    assert list(got)[:7] == ["kimg", "iterations", "images_per_s", "loss_g", "loss_fake", "loss_disc", "loss_adv"]
    assert got == {"kimg": 3.2, "iterations": 100, "images_per_s": 12.5, "loss_g": -0.25, "loss_fake": 0.5,
                   "loss_disc": 0.7, "loss_adv": 0.1, "nan_dropped": 0, "peak_mem_gib": 3.1}
    assert tasks.train_metrics(0.5, 4, {}) == {"kimg": 0.5, "iterations": 4}  # no iteration logged: no rate
