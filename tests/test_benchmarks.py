"""Smoke runs of the benchmark scripts on the tiny teacher (CPU), so they do not rot. Nothing here is timed."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


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
    common = [sys.executable, "benchmarks/toy_quality.py", "--n", "16", "--kimg", "0.032", "--batch", "16",
              "--micro-batch", "16", "--ema", "0", "--out", str(tmp_path)]
    env = {**__import__("os").environ, "SIDFLOW_NO_BAR": "1"}
    # A finetune row (real pairs, the GAN term) and the teacher at 25 steps, each scored by the three evaluators
    # shipped with the teacher; the merge marks the SiD row against the teacher at its κ.
    subprocess.run(common + ["--rows", "sid", "--sid-runs", "sid-adv:stage=finetune,kappa=2,steps=2,precision=fp32",
                             "--real-pairs", "32", "--file", "a.json"], check=True, cwd=ROOT, capture_output=True,
                   env=env)
    subprocess.run(common + ["--rows", "real,teacher", "--teacher-steps", "25", "--teacher-cfg", "2", "--file",
                             "b.json"], check=True, cwd=ROOT, capture_output=True, env=env)
    subprocess.run([sys.executable, "benchmarks/toy_quality.py", "--merge", f"{tmp_path}/b.json,{tmp_path}/a.json",
                    "--out", str(tmp_path)], check=True, cwd=ROOT, capture_output=True)
    rows = json.loads((tmp_path / "toy_quality.json").read_text())["metrics"]["rows"]
    assert [r["row"] for r in rows] == ["real", "teacher", "sid-adv"]
    adv = rows[2]
    assert (adv["steps"], adv["kappa"], adv["images_seen"], adv["config"]["stage"]) == (2, 2.0, 32, "finetune")
    assert 0 <= adv["prompt_acc_seen"] <= 1 and adv["shapes_fid"] > 0 and len(adv["shapes_fid_by_evaluator"]) == 3
    assert abs(adv["shapes_fid"] - sum(adv["shapes_fid_by_evaluator"]) / 3) < 1e-2
    beats = all(a < b for a, b in zip(adv["shapes_fid_by_evaluator"], rows[1]["shapes_fid_by_evaluator"]))
    assert adv["beats_teacher_25"] == beats and adv["fid_vs_teacher_25"] > 0
    # a merged table merges again flat, each part keeping the tree it ran on
    subprocess.run([sys.executable, "benchmarks/toy_quality.py", "--merge", f"{tmp_path}/toy_quality.json,"
                    f"{tmp_path}/a.json", "--out", str(tmp_path), "--file", "again.json"], check=True, cwd=ROOT,
                   capture_output=True)
    again = json.loads((tmp_path / "again.json").read_text())
    assert [r["row"] for r in again["metrics"]["rows"]] == ["real", "teacher", "sid-adv", "sid-adv"]
    assert [c["rows"] for c in again["config"]["parts"]] == ["real,teacher", "sid", "sid"]
    assert all(c["git_sha"] == again["git_sha"] for c in again["config"]["parts"])


def test_scaling_script_measures_both_placements(tmp_path):
    # 2 CPU processes over gloo stand in for 2 GPUs; the 1-process run is the reference of both placements.
    subprocess.run([sys.executable, "benchmarks/ddp.py", "--model", "tiny-sdxl", "--gpus", "1,2", "--sharding",
                    "ddp,fsdp",
                    "--micro-batch", "1", "--batch", "2", "--iters", "1", "--warmup", "1", "--file", "scaling.json",
                    "--out", str(tmp_path)], check=True, cwd=ROOT, capture_output=True,
                   env={**__import__("os").environ, "SIDFLOW_NO_BAR": "1"})
    m = json.loads((tmp_path / "scaling.json").read_text())["metrics"]
    for mode in ("ddp", "fsdp"):
        assert [r["gpus"] for r in m[mode]] == [1, 2]
        assert m[mode][0]["efficiency"] == 1.0 and m[mode][1]["images_per_s_per_gpu"] > 0
        # Same draws, same losses, whatever the placement, to bf16's resolution (8 bits: steps of 2^-8 ≈ 4e-3 relative);
        # 1.1e-3 measured with torch 2.14.1 on 2 CPU cores.
        assert m[mode][1]["max_rel_diff_loss_fake"] < 4e-3
    assert m["ddp"][0] == m["fsdp"][0] and m["scaling_2gpu"] == m["ddp"][1]["efficiency"]
