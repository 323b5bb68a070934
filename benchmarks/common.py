"""Shared by the benchmark scripts: the result record (name, device, git sha, command, versions, metrics)."""

import datetime
import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def versions() -> dict:
    import torch

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    for name in ("diffusers", "transformers", "accelerate"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def device_tag(device, smoke: bool = False) -> str:
    """Short name of the accelerator a run used, for result file names: h100, h200, gpu; tiny_cpu (smoke) or cpu."""
    import torch

    if device.type != "cuda":
        return "tiny_cpu" if smoke else "cpu"
    name = torch.cuda.get_device_name(device)
    return "h100" if "H100" in name else "h200" if "H200" in name else "gpu"


def git_sha() -> str:
    """HEAD's sha, with "-dirty" when tracked files differ from it: a GPU box's copy of the working tree can come
    with the history of an older commit, whose sha alone would name code that did not run."""
    here = Path(__file__).parent
    try:
        out = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], capture_output=True, text=True,
                             cwd=here).stdout.strip()
        if len(out) != 40:  # a copy without history answers "HEAD"
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


# Teachers the distill benchmarks build from configs (random weights, no download): name -> sidflow.toy.tiny attribute.
MODELS = {"sd15": "SD15", "sdxl": "SDXL", "tiny": "tiny_configs", "tiny-sdxl": "tiny_sdxl_configs"}


def synthetic_run(model: str, prefix: str) -> tuple[Path, str, str]:
    """Return (work dir, teacher path, prompts path): a teacher built from `model`'s configs (on the GPU when there is
    one) and 1,000 distinct prompts; GPU 0 is left empty for the runs, which are child processes."""
    import tempfile

    import torch

    from sidflow.toy import tiny

    work = Path(tempfile.mkdtemp(prefix=prefix))
    configs = getattr(tiny, MODELS[model])
    teacher = tiny.build_sd(work / "teacher", configs if isinstance(configs, dict) else configs(),
                            device="cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    (work / "prompts.txt").write_text("\n".join(f"a photo of object number {i}" for i in range(1000)))
    return work, teacher, str(work / "prompts.txt")


def record(name: str, file: str, gpus: int, metrics: dict, config: dict, out_dir: Path = RESULTS,
           final: bool = True) -> dict:
    """Write the result to out_dir/file and, when final, print it as one JSON line (partial saves stay quiet)."""
    repo, out = str(Path(__file__).resolve().parent.parent) + "/", str(out_dir.resolve())

    def portable(value):  # a committed record names no machine's paths: the repo's own relative, out_dir as $OUT
        if not isinstance(value, str):
            return value
        return value.replace(repo, "") if out.startswith(repo) else value.replace(out, "$OUT").replace(repo, "")

    result = {"name": name, "device": device_name(), "gpus": gpus, "git_sha": git_sha(),
              "command": portable("python " + " ".join(sys.argv)), "versions": versions(),
              "date": datetime.date.today().isoformat(), "metrics": metrics,
              "config": {k: portable(v) for k, v in config.items()}}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / file).write_text(json.dumps(result, indent=2) + "\n")
    if final:
        print(json.dumps(result))
    return result


def build_generator(configs: dict, device):
    """Return a one-step Sampler over SD-layout networks with random weights, built on `device` (no files)."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sidflow.evaluate.sampling import Sampler
    from sidflow.method.vp import vp_tables
    from sidflow.teacher import Teacher
    from sidflow.toy.tiny import write_char_tokenizer

    tok_dir = Path(tempfile.mkdtemp(prefix="sidflow-tok-"))
    write_char_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77,
                              pad_token="<|endoftext|>")
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of a minute on the CPU
        unet = UNet2DConditionModel(**configs["unet"]).eval().requires_grad_(False)
        vae = AutoencoderKL(**configs["vae"]).eval().requires_grad_(False)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                            **configs["text"])).eval().requires_grad_(False)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                          prediction_type="epsilon", clip_sample=False, steps_offset=1)
    a, s = vp_tables(sched.alphas_cumprod)
    nets = Teacher(path="", unet=unet, text_encoder=text, tokenizer=tokenizer, vae=vae,
                   scheduler_config=dict(sched.config), alphas_cumprod=sched.alphas_cumprod, a=a, s=s)
    return Sampler(nets, steps=1, t_init=625)


def timed(fn, device) -> tuple[object, float]:
    """Return (fn(), seconds), synchronizing the GPU on both sides."""
    import time

    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start
