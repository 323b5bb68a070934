"""Smoke runs of the benchmark scripts on the tiny teacher (CPU), so they do not rot. Nothing here is timed."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _script(name: str):
    """Import benchmarks/<name>.py as a module (the scripts put benchmarks/ on sys.path themselves)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_sweep_records_each_run_and_goes_on_past_a_failed_one(tmp_path):
    # Each combination is its own process; the first (bf16) dies at a failpoint, as an OOM outside the training or a
    # crash would end it, and is recorded as such; the fp32 run is measured and profiled.
    env = {**os.environ, "SIDFLOW_NO_BAR": "1", "SIDFLOW_FAILPOINT": "distill:validate",
           "SIDFLOW_FAILPOINT_ONCE": str(tmp_path / "killed-once")}
    subprocess.run([sys.executable, "benchmarks/throughput.py", "--model", "tiny", "--micro-batch", "1",
                    "--rounds", "1", "--iters", "1", "--warmup", "1", "--ema", "0", "--precisions", "bf16,fp32",
                    "--generator-backward", "split", "--torch-profile", "--out", str(tmp_path)], check=True, cwd=ROOT,
                   capture_output=True, env=env)
    record = json.loads((tmp_path / "throughput_tiny_sweep_cpu.json").read_text())
    assert {"name", "device", "gpus", "git_sha", "command", "versions", "date", "metrics", "config"} <= record.keys()
    m = record["metrics"]
    failed, ran = m["runs"]
    assert failed["run"] == "bf16 mb1 eager split" and failed["error"] == "exit code -9"
    assert ran["run"] == "fp32 mb1 eager split" and ran["images_per_s_per_gpu"] > 0 and ran["precision"] == "fp32"
    assert ran["generator_backward"] == "split" and ran["compile"] is False and m["bf16_over_fp32"] == {}
    assert ran["iterations_timed"] == 1 and ran["unet_forward_tflop_per_sample"] > 0
    assert abs(sum(ran["phase_split"].values()) - 1) < 0.01
    prof = ran["torch_profile"]  # one iteration after the timed one, on the CPU clock here
    assert prof["clock"] == "cpu" and len(prof["top_ops"]) == 10 and abs(sum(prof["kinds_pct"].values()) - 100) < 1
    assert {"convolution", "matmul", "attention"} <= prof["kinds_pct"].keys()
    kind = _script("throughput").kind
    assert all(kind(r["kernel"]) == "other" for r in prof["top_other"])  # the names still to classify


def test_throughput_sweep_compares_runs_that_differ_in_one_setting(tmp_path):
    # The sweep's ratios: bf16 over the fp32 run of the same micro-batch, compile and backward (an fp32 run has no
    # autocast, so both bf16 norms settings divide by it), and each option over plain eager/joint/fp32 norms.
    import argparse

    tp = _script("throughput")
    runs = tp.grid(argparse.Namespace(runs="bf16/8/off/joint;bf16/8/off/joint/autocast;fp32/8/off/joint/autocast;"
                                           "bf16/16/off/split/autocast;bf16/8/off/joint/channels_last=false",
                                      norms="fp32", set=[]))
    ips = (10.0, 12.0, 2.0, 13.0, 11.0)
    done = [{"run": tp.label(r), "setting": r, "micro_batch": r["micro_batch"], "images_per_s_per_gpu": v,
             "peak_mem_gib": 1.0} for r, v in zip(runs, ips)]
    assert [d["run"] for d in done] == ["bf16 mb8 eager joint", "bf16 mb8 eager joint autocast-norms",
                                        "fp32 mb8 eager joint", "bf16 mb16 eager split autocast-norms",
                                        "bf16 mb8 eager joint channels_last=false"]
    args = argparse.Namespace(model="tiny", file="sweep.json", gpus=1, out=str(tmp_path), forward_tflop=1.0)
    tp._record_sweep(args, done, final=True)
    m = json.loads((tmp_path / "sweep.json").read_text())["metrics"]
    assert m["bf16_over_fp32"] == {"mb8 eager joint": 5.0, "mb8 eager joint autocast-norms": 6.0}
    assert m["speedup_over_eager_joint"] == {"bf16 mb8 eager joint autocast-norms": 1.2,
                                             "bf16 mb8 eager joint channels_last=false": 1.1}
    assert m["best_micro_batch"]["bf16 eager joint autocast-norms"]["micro_batch"] == 8


def test_fewstep_adv_script_measures_both_runs_in_one_command(tmp_path):
    subprocess.run([sys.executable, "benchmarks/fewstep_adv.py", "--model", "tiny", "--micro-batch", "1", "--rounds",
                    "1", "--iters", "1", "--warmup", "0", "--pairs", "4", "--steps", "2", "--out", str(tmp_path)],
                   check=True, cwd=ROOT, capture_output=True)
    m = json.loads((tmp_path / "fewstep_adv_tiny_cpu.json").read_text())["metrics"]
    assert m["one_step_lsg"]["images_per_s_per_gpu"] > 0 and m["k2_adv"]["loss_disc"] > 0
    assert m["cost_ratio"] == round(m["one_step_lsg"]["images_per_s_per_gpu"] / m["k2_adv"]["images_per_s_per_gpu"], 3)


def test_eval_throughput_script_writes_its_record(tmp_path):
    subprocess.run([sys.executable, "benchmarks/eval_throughput.py", "--smoke", "--vae-sweep", "--workers-sweep", "1,1",
                    "--out", str(tmp_path)], check=True, cwd=ROOT, capture_output=True)
    record = json.loads((tmp_path / "eval_throughput_tiny_cpu.json").read_text())
    m = record["metrics"]
    assert m["images_measured"] == 8 and m["images_per_s"] > 0 and m["projected_30k_minutes"] > 0
    assert set(m["passes"]) == {"strict", "floor_half_batch", "sid_lsg_harness", "default", "vae_fp32"}
    assert [r["workers"] for r in m["default_images_per_s_by_workers"]] == [1, 1]  # a repeated count kept twice
    assert m["settings"]["floor_half_batch"]["batch"] == 2
    assert m["passes"]["strict"]["delta_fid_vs_strict"] == 0 and m["settings"]["default"]["clip_precision"] == "fp16"
    # the decode floor (eager at half the batch) and each decode beside it, in pixels and in same-seed FID
    assert set(m["vae_vs_eager_fp32_pixels"]) == set(m["decode_fid_vs_eager_fp32_same_seeds"]) == {
        "eager_fp16", "compiled_fp32", "compiled_fp16", "eager_fp32_half_batch"}
    assert len(m["vae_decode"]["images_per_s"]) == 6 and len(m["vae_decode"]["vs_first"]) == 5  # vae_decode.sweep


def test_eval_host_script_times_the_generator_under_each_cpu_load(tmp_path):
    subprocess.run([sys.executable, "benchmarks/eval_host.py", "--smoke", "--workers", "0,1", "--switch-ms", "5",
                    "--loop", "4", "--out", str(tmp_path)], check=True, cwd=ROOT, capture_output=True)
    m = json.loads((tmp_path / "eval_host_tiny_cpu.json").read_text())["metrics"]
    assert set(m["generator_images_per_s"]) == {"workers_0_switch_5ms", "workers_1_switch_5ms"}
    assert all(v > 0 for v in m["generator_images_per_s"].values())
    chain = m["cpu_chain_images_per_s"]
    assert chain["workers_0_switch_5ms"] == 0 < chain["workers_1_switch_5ms"]
    loop = m["loop"]  # the stage's loop, its parts timed where they are called
    assert loop["images"] == 4 and 0 < loop["main_thread_generator_seconds"] <= loop["seconds"]
    assert loop["first_pass_untimed_images_per_s"] > 0
    assert loop["measuring_thread_seconds"]["features"] > 0 and loop["pool_chain_thread_seconds"] > 0


def test_vae_decode_script_compares_each_variant_with_eager_fp32(tmp_path):
    subprocess.run([sys.executable, "benchmarks/vae_decode.py", "--smoke", "--batches", "1", "--batch", "2", "--out",
                    str(tmp_path)], check=True, cwd=ROOT, capture_output=True)
    m = json.loads((tmp_path / "vae_decode_tiny_cpu.json").read_text())["metrics"]
    assert set(m["images_per_s"]) == {"fp32_contiguous", "fp16_contiguous"}  # compiled variants are GPU-only
    assert set(m["vs_first"]) == {"fp16_contiguous"} and 0 <= m["vs_first"]["fp16_contiguous"]["fraction_changed"] <= 1


def test_toy_quality_sid_rows_and_merge(tmp_path):
    common = [sys.executable, "benchmarks/toy_quality.py", "--n", "8", "--kimg", "0.032", "--batch", "16",
              "--micro-batch", "16", "--ema", "0", "--out", str(tmp_path)]
    env = {**__import__("os").environ, "SIDFLOW_NO_BAR": "1"}
    # A finetune row (real pairs, the GAN term) and the teacher at 25 steps, each scored by the three evaluators
    # shipped with the teacher; the merge marks the SiD row against the teacher at its κ.
    subprocess.run(common + ["--rows", "sid", "--sid-runs", "sid-adv:stage=finetune,kappa=2,steps=2,precision=fp32",
                             "--real-pairs", "32", "--curve-kimg", "0.016", "--file", "a.json"], check=True, cwd=ROOT,
                   capture_output=True, env=env)
    subprocess.run(common + ["--rows", "real,real-vae,teacher", "--teacher-steps", "25", "--teacher-cfg", "2",
                             "--file", "b.json"], check=True, cwd=ROOT, capture_output=True, env=env)
    subprocess.run([sys.executable, "benchmarks/toy_quality.py", "--merge", f"{tmp_path}/b.json,{tmp_path}/a.json",
                    "--out", str(tmp_path)], check=True, cwd=ROOT, capture_output=True)
    rows = json.loads((tmp_path / "toy_quality.json").read_text())["metrics"]["rows"]
    assert [r["row"] for r in rows] == ["real", "real-vae", "teacher", "sid-adv"]
    assert rows[1]["shapes_fid"] != rows[0]["shapes_fid"]  # the same renders, changed by the VAE round trip
    adv = rows[3]
    # the curve: the run's EMA generator at each checkpoint, the last one the exported model the row scored
    assert [p["kimg"] for p in adv["curve"]] == [0.016, 0.032]
    assert adv["curve"][-1]["shapes_fid_by_evaluator"] == adv["shapes_fid_by_evaluator"]
    assert adv["curve"][0]["shapes_fid_by_evaluator"] != adv["shapes_fid_by_evaluator"]
    assert (adv["steps"], adv["kappa"], adv["images_seen"], adv["config"]["stage"]) == (2, 2.0, 32, "finetune")
    assert 0 <= adv["prompt_acc_seen"] <= 1 and adv["shapes_fid"] > 0 and len(adv["shapes_fid_by_evaluator"]) == 3
    assert abs(adv["shapes_fid"] - sum(adv["shapes_fid_by_evaluator"]) / 3) < 1e-2
    beats = all(a < b for a, b in zip(adv["shapes_fid_by_evaluator"], rows[2]["shapes_fid_by_evaluator"]))
    assert adv["beats_teacher_25"] == beats and adv["fid_vs_teacher_25"] > 0
    # a merged table merges again flat, each part keeping the tree it ran on
    subprocess.run([sys.executable, "benchmarks/toy_quality.py", "--merge", f"{tmp_path}/toy_quality.json,"
                    f"{tmp_path}/a.json", "--out", str(tmp_path), "--file", "again.json"], check=True, cwd=ROOT,
                   capture_output=True)
    again = json.loads((tmp_path / "again.json").read_text())
    assert [r["row"] for r in again["metrics"]["rows"]] == ["real", "real-vae", "teacher", "sid-adv", "sid-adv"]
    assert [c["rows"] for c in again["config"]["parts"]] == ["real,real-vae,teacher", "sid", "sid"]
    assert all(c["git_sha"] == again["git_sha"] for c in again["config"]["parts"])


def test_toy_sweep_scores_each_milestone_of_each_run(tmp_path):
    env = {**__import__("os").environ, "SIDFLOW_NO_BAR": "1"}
    subprocess.run([sys.executable, "benchmarks/toy_sweep.py", "--n", "8", "--milestones", "0.016,0.032", "--runs",
                    "a:batch=16,micro_batch=16,precision=fp32,ema_halflife_kimg=0", "--out", str(tmp_path)],
                   check=True, cwd=ROOT, capture_output=True, env=env)
    points = json.loads((tmp_path / "toy_sweep.json").read_text())["metrics"]["curves"]["a"]["points"]
    assert [p["kimg"] for p in points] == [0.016, 0.032]
    assert all(p["shapes_fid"] > 0 and 0 <= p["prompt_acc_seen"] <= 1 for p in points)


def test_scaling_script_measures_a_placement_against_one_process(tmp_path):
    # 2 CPU processes over gloo stand in for 2 GPUs; the 1-process run is the reference. FSDP, the placement with the
    # most to get wrong; both placements' numerics against one process are test_distill's (two_processes_match_one).
    subprocess.run([sys.executable, "benchmarks/ddp.py", "--model", "tiny", "--gpus", "1,2", "--sharding", "fsdp",
                    "--micro-batch", "1", "--batch", "2", "--iters", "1", "--warmup", "0", "--file", "scaling.json",
                    "--out", str(tmp_path)], check=True, cwd=ROOT, capture_output=True,
                   env={**__import__("os").environ, "SIDFLOW_NO_BAR": "1"})
    m = json.loads((tmp_path / "scaling.json").read_text())["metrics"]
    assert [r["gpus"] for r in m["fsdp"]] == [1, 2]
    assert m["fsdp"][0]["efficiency"] == 1.0 and m["fsdp"][1]["images_per_s_per_gpu"] > 0
    # Same draws, same losses, whatever the placement, to bf16's resolution (8 bits: steps of 2^-8 ≈ 4e-3 relative).
    assert m["fsdp"][1]["max_rel_diff_loss_fake"] < 4e-3
    assert m["scaling_2gpu"] == m["fsdp"][1]["efficiency"]  # the flat names: the first placement's


def test_kimg_plot_keeps_to_one_protocol_and_spans_the_seeds(tmp_path):
    three = {"shapes_fid_by_evaluator": [0.0, 0.0, 0.0]}  # rows of the first protocol have no list: 1 evaluator
    rows = [{"row": "teacher", "steps": 25, "guidance": 2.0, "shapes_fid": 150.0},
            {"row": "teacher", "steps": 25, "kappa": 2.0, "shapes_fid": 210.0, **three},
            *[{"row": "sid-lsg", "steps": 1, "guidance": 2.0, "shapes_fid": f, "images_seen": 200_704}
              for f in (170, 180)],
            {"row": "sid-lsg", "steps": 1, "guidance": 2.0, "shapes_fid": 140.0, "images_seen": 400_384},
            {"row": "sid-fewstep", "steps": 4, "kappa": 2.0, "shapes_fid": 300.0, "images_seen": 100_352, **three},
            {"row": "sid-fewstep", "steps": 4, "kappa": 2.0, "shapes_fid": 99.0, "images_seen": 100_352, **three,
             "config": {"stage": "finetune"}}]
    curves = [{"row": "sid-ctrl", "steps": 4, "kappa": 2.0, "shapes_fid": 80.0, "images_seen": 80_000, **three,
               "config": {"stage": "finetune", "lr_g": lr, "seed": "0"},
               "curve": [{"kimg": 40.0, "shapes_fid": 90.0}, {"kimg": 80.0, "shapes_fid": 80.0}]} for lr in ("1", "2")]
    # a curve from another run's start (init) is not a line: its kimg do not count from the teacher
    curves.append({**curves[0], "config": {"stage": "finetune", "init": "run0"}})
    source = tmp_path / "tq.json"
    source.write_text(json.dumps({"metrics": {"rows": rows}}))
    subprocess.run([sys.executable, "benchmarks/plot_toy_kimg.py", "--source", str(source), "--out", str(tmp_path)],
                   check=True, cwd=ROOT, capture_output=True)
    m = json.loads((tmp_path / "toy_fid_vs_kimg.json").read_text())["metrics"]
    assert m["evaluators"] == 1 and m["teacher_25"] == {"κ2": 150.0}  # the three-evaluator rows are left out
    assert m["series"] == {"K1 κ2": [{"kimg": 201, "fid": 175.0, "low": 170, "high": 180, "runs": 2},
                                     {"kimg": 400, "fid": 140.0, "low": 140.0, "high": 140.0, "runs": 1}]}
    assert (tmp_path / "toy_fid_vs_kimg.png").stat().st_size > 0
    series, teacher = _script("plot_toy_kimg").points(rows, 3)  # what --evaluators 3 plots
    assert teacher == {"κ2": 210.0}  # and the fine-tuned row (FID 99 at the same steps, κ and kimg) is not plotted:
    assert series == {"K4 κ2": [{"kimg": 100, "fid": 300.0, "low": 300.0, "high": 300.0, "runs": 1}]}
    # Rows scored along their course are lines of their own, named by the settings that tell them apart.
    series, _ = _script("plot_toy_kimg").points(rows + curves, 3)
    line = [{"kimg": 40.0, "fid": 90.0, "low": 90.0, "high": 90.0, "runs": 1},
            {"kimg": 80.0, "fid": 80.0, "low": 80.0, "high": 80.0, "runs": 1}]
    assert series == {"K4 κ2": [{"kimg": 100, "fid": 300.0, "low": 300.0, "high": 300.0, "runs": 1}],
                      "sid-ctrl K4 κ2 (lr_g=1)": line, "sid-ctrl K4 κ2 (lr_g=2)": line}
