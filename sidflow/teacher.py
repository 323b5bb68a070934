"""Load a diffusers text-to-image teacher and expose what SiD needs from it (method.md §1, §3, §6.4).

A teacher is a StableDiffusionPipeline-layout directory (unet/, text_encoder/, tokenizer/, scheduler/, vae/,
model_index.json), plus text_encoder_2/ and tokenizer_2/ for SDXL, local or at a storage URI. The schedule is
rebuilt as DDPM with `clip_sample` off, since a bare DDPM config defaults to clipping x0 into [-1, 1], which is
wrong for latents (method.md §8.3).

SDXL conditioning is packed into one tensor per prompt, [78, 2048]: rows 0..76 the context (both encoders'
penultimate hidden states, concatenated), row 77 the pooled projection of encoder 2 followed by the six time ids.
Guidance, prompt dropout, the prompt cache and the sampler then treat SD and SDXL prompts alike; `score_net`
unpacks it into the UNet's `added_cond_kwargs`.
"""

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from sidflow import storage
from sidflow.method.guidance import ScoreNet
from sidflow.method.vp import at, vp_tables, x0_from_eps

# {"source", "fingerprint"[, "commit"]} of a hub teacher or of an S3 upload without a manifest, published inside the
# directory, so that fingerprint() of the copy is what watch_teachers computes from the source without a download.
INFO_FILE = "sidflow-teacher.json"
SD_PARTS = ("unet", "text_encoder", "tokenizer", "scheduler", "vae")
SDXL_PARTS = ("text_encoder_2", "tokenizer_2")
NULL_MODES = ("auto", "empty", "zeros")  # the unconditional prompt ∅: auto follows the teacher (method.md §6.4)


class TeacherError(ValueError):
    """A teacher directory that sidflow cannot use; the message is one line naming the problem."""


def check_teacher_dir(path: str | os.PathLike, generator: bool = False) -> dict:
    """Return the teacher's scheduler config after checking layout, model type and that every network's weights are
    whole; raise TeacherError if unusable. `generator` accepts an exported sidflow generator (load_generator)."""
    path = Path(path)
    if not path.is_dir():
        raise TeacherError(f"teacher directory {path} does not exist")
    if not (path / "model_index.json").is_file():
        raise TeacherError(f"teacher {path} has no model_index.json: not a diffusers pipeline directory")
    if (path / "sidflow.json").is_file() and not generator:
        raise TeacherError(f"teacher {path} is a generator exported by sidflow (it has sidflow.json), not a "
                           "teacher: distill from the teacher it came from, or sample it with `sidflow generate`")
    index = _read_json(path / "model_index.json")
    sdxl = _is_sdxl(index)
    missing = [p for p in SD_PARTS + SDXL_PARTS * sdxl if not (path / p).is_dir() or not any((path / p).iterdir())]
    if missing:
        raise TeacherError(f"teacher {path} is missing {', '.join(missing)}" + " (an SDXL pipeline)" * sdxl)
    for part in NETWORKS + ("text_encoder_2",) * sdxl:
        _check_weights(path / part)
    sched_file = path / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        raise TeacherError(f"teacher {path} has no scheduler/scheduler_config.json")
    sched = _read_json(sched_file)
    prediction = sched.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise TeacherError(f"teacher {path} predicts {prediction!r}; sidflow distills ε-prediction DDPM teachers only")
    if "beta_schedule" not in sched and sched.get("trained_betas") is None:
        raise TeacherError(f"teacher {path} scheduler {sched.get('_class_name')} has no DDPM beta schedule")
    if sched.get("rescale_betas_zero_snr"):
        raise TeacherError(f"teacher {path} uses a zero-terminal-SNR schedule; sidflow supports the plain VP schedule")
    return sched


NETWORKS = ("unet", "text_encoder", "vae")  # the parts with weights (SDXL adds text_encoder_2)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TeacherError(f"teacher file {path} is not valid JSON ({str(exc).split(':')[0]})") from None


def _check_weights(part: Path) -> None:
    # Every weights file whole, every shard an index names present: a torn copy fails here in one line, not in a
    # 50-line traceback from diffusers once the training pod is up. safe_open reads only the header, which records
    # the length the data must have.
    from safetensors import SafetensorError, safe_open

    files = sorted(part.glob("*.safetensors")) + sorted(part.glob("*.bin"))
    if not files:
        raise TeacherError(f"teacher part {part} has no weights (*.safetensors or *.bin)")
    for index in part.glob("*.index.json"):
        shards = set(_read_json(index).get("weight_map", {}).values())
        absent = sorted(s for s in shards if not (part / s).is_file())
        if absent:
            raise TeacherError(f"teacher part {part} is missing {', '.join(absent)}, named in {index.name}")
    for f in files:
        if f.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(f), "pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise TeacherError(f"teacher weights {f} are damaged or truncated ({str(exc).splitlines()[0]})") from None


def _is_sdxl(index: dict) -> bool:
    return any(p in index for p in SDXL_PARTS) or "XL" in index.get("_class_name", "")


def fingerprint(uri: str) -> str | None:
    """Return the fingerprint of the teacher published at `uri` (hub commit or content digest), None if absent."""
    manifest = storage.read_manifest(uri)
    if manifest is None:
        return None
    if any(f["path"] == INFO_FILE for f in manifest["files"]):
        return json.loads(storage.read_text(storage.join(uri, INFO_FILE)))["fingerprint"]
    return "sha256:" + storage.manifest_digest(manifest)


def listing_fingerprint(rows: list[dict]) -> str:
    """Return the fingerprint of a directory without a manifest from its listing (storage.list_stats rows): sha256
    over the sorted (path, size, ETag) rows, where a server without ETags gives the object's LastModified instead.
    No byte is read; an upload that changes a file's bytes changes its ETag (and any upload its LastModified)."""
    table = sorted((r["path"], r["size"], r["etag"] or r["modified"]) for r in rows)
    return "s3-listing:sha256:" + hashlib.sha256(json.dumps(table).encode("utf-8")).hexdigest()


def materialize(uri: str, cache_dir: str | None = None) -> str:
    """Return a local directory holding the published teacher at `uri` (fetched and verified if remote)."""
    if not storage.is_s3(uri):
        return storage.local_path(uri)
    manifest = storage.read_manifest(uri)
    if manifest is None:
        raise TeacherError(f"teacher {uri} has no manifest.json: publish it with `sidflow download-teacher`")
    root = Path(cache_dir) if cache_dir else storage.cache_root()
    return storage.fetch_dir_once(uri, root / "teachers" / storage.manifest_digest(manifest)[:16])


@dataclass
class Teacher:
    """The frozen teacher: networks, the VP tables (a_t, s_t), the null embedding and a prompt-embedding cache."""

    path: str
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    vae: torch.nn.Module
    scheduler_config: dict
    alphas_cumprod: Tensor
    a: Tensor  # [T] a_t = sqrt(alpha_bar_t)
    s: Tensor  # [T] s_t = sqrt(1 - alpha_bar_t)
    text_encoder_2: torch.nn.Module | None = None  # SDXL only
    tokenizer_2: object = None
    null_zeros: bool = False  # ∅ is zeros (SDXL's force_zeros_for_empty_prompt) instead of the encoding of ""
    cache_size: int = 4096
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False)

    @property
    def vae_scale(self) -> float:
        """The VAE latent scaling factor (0.18215 for SD1.5, 0.13025 for SDXL)."""
        return float(self.vae.config.scaling_factor)

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def image_size(self) -> int:
        """Return the side of the decoded image in pixels (the VAE upsamples by 2 per block after the first)."""
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Return (C, H, W) of the UNet's latents."""
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Tensor:
        """Return prompt conditioning [B, 77, D] (CLIP last hidden state, method.md §2), or SDXL's packed
        [B, 78, 2048] (module docstring, method.md §6.4); cached per prompt on the CPU."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if todo:
            emb = self._encode_sdxl(todo) if self.is_sdxl else self._hidden(self.text_encoder, self.tokenizer, todo)[0]
            for p, e in zip(todo, emb.float().cpu()):
                self._cache[p] = e
        for p in prompts:
            self._cache.move_to_end(p)
        out = torch.stack([self._cache[p] for p in prompts])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    @staticmethod
    def _hidden(encoder, tokenizer, prompts: list[str], all_layers: bool = False):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=all_layers)

    def _encode_sdxl(self, prompts: list[str]) -> Tensor:
        # Both encoders' penultimate hidden states (SDXL's clip_skip convention), the pooled projection of the
        # second, and time ids (original size, crop top-left, target size) for an uncropped square image.
        one = self._hidden(self.text_encoder, self.tokenizer, prompts, all_layers=True)
        two = self._hidden(self.text_encoder_2, self.tokenizer_2, prompts, all_layers=True)
        context = torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1)  # [B, 77, D1 + D2]
        pooled = two.text_embeds  # [B, P]
        size = self.image_size
        time_ids = torch.tensor([size, size, 0, 0, size, size], dtype=pooled.dtype, device=pooled.device)
        row = torch.zeros(len(prompts), 1, context.shape[-1], dtype=context.dtype, device=context.device)
        row[:, 0, : pooled.shape[-1]] = pooled
        row[:, 0, pooled.shape[-1] : pooled.shape[-1] + 6] = time_ids
        return torch.cat([context, row], dim=1)

    def null(self) -> Tensor:
        """Return ∅, the unconditional prompt [1, 77, D] (SDXL: [1, 78, 2048]): the encoding of `""` (method.md §3,
        not a zero tensor), or zeros where the teacher's pipeline zeroes it (SDXL; its time ids are kept)."""
        empty = self.encode([""])
        if not self.null_zeros:
            return empty
        zeros = torch.zeros_like(empty)
        if self.is_sdxl:
            zeros[:, -1] = empty[:, -1]
            zeros[:, -1, : self.pooled_dim] = 0
        return zeros

    @property
    def pooled_dim(self) -> int:
        return _pooled_dim(self.unet.config)

    def x0(self, eps: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Return the x0 prediction for ε̂ at (x_t, t), no clipping. method.md §1."""
        return x0_from_eps(x_t, eps, at(self.a, t, x_t), at(self.s, t, x_t))


def _pooled_dim(config) -> int:
    # SDXL's added-condition input is [pooled (P) | 6 time ids, each embedded to addition_time_embed_dim].
    return config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim


def score_net(unet: torch.nn.Module) -> ScoreNet:
    """Return net(x_t, t, c) -> ε̂ in fp32 for a UNet2DConditionModel; SDXL's packed c is unpacked here."""
    config = getattr(unet, "module", unet).config  # under DDP the UNet is the wrapper's .module
    if config.get("addition_embed_type") != "text_time":

        def net(x_t: Tensor, t: Tensor, c: Tensor) -> Tensor:
            return unet(x_t, t, encoder_hidden_states=c.to(x_t.device)).sample.float()

        return net
    p = _pooled_dim(config)

    def net_xl(x_t: Tensor, t: Tensor, c: Tensor) -> Tensor:
        c = c.to(x_t.device)
        added = {"text_embeds": c[:, -1, :p], "time_ids": c[:, -1, p : p + 6]}
        return unet(x_t, t, encoder_hidden_states=c[:, :-1], added_cond_kwargs=added).sample.float()

    return net_xl


# The blocks a UNet repeats: ResnetBlock2D (22 in SD1.5) and BasicTransformerBlock (16), the units diffusers'
# gradient checkpointing wraps. Compiled one by one (regional compilation), each class is traced once per shape and
# mode and reused by every block alike, so compiling costs a few blocks' time, not a whole UNet's.
REPEATED_BLOCKS = ("ResnetBlock2D", "BasicTransformerBlock")
# Each compiled class is one function to dynamo, with an entry per block shape × grad mode × weight dtype and
# requires_grad (G, the fake and the bf16 teacher, with and without a graph): far past its default of 8, after
# which it would run the rest eagerly.
RECOMPILE_LIMIT = 256


class _AutocastNorm:
    """Mixin for a norm module that, under autocast, runs in the autocast dtype (see autocast_norms).

    A subclass names the functional norm and the module fields it takes after the input."""

    def forward(self, x: Tensor) -> Tensor:
        kind = x.device.type
        if not torch.is_autocast_enabled(kind):
            return super().forward(x)
        dtype = torch.get_autocast_dtype(kind)  # the dtype autocast would run a matmul in on x's device
        # A differentiable cast: G's and the fake's fp32 master weights still receive their gradients.
        weight, bias = (None if p is None else p.to(dtype) for p in (self.weight, self.bias))
        with torch.autocast(kind, enabled=False):
            return self._norm(x.to(dtype), weight, bias)


class _AutocastGroupNorm(_AutocastNorm, torch.nn.GroupNorm):
    def _norm(self, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        return torch.nn.functional.group_norm(x, self.num_groups, weight, bias, self.eps)


class _AutocastLayerNorm(_AutocastNorm, torch.nn.LayerNorm):
    def _norm(self, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        return torch.nn.functional.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


def autocast_norms(unet: torch.nn.Module) -> int:
    """Make the GroupNorms and LayerNorms of `unet` run in the autocast dtype (bf16) under autocast; return how many.

    Autocast runs these norms in fp32: each casts its bf16 input up and returns fp32, so the SiLU after it runs in
    fp32 and the next convolution casts back, three full passes over the activation per norm and twice the memory
    for what the backward keeps. In bf16 the kernels still accumulate mean and variance in fp32, as the reference's
    fp16 mode runs them. Outside autocast (fp32 runs, the exported model) a norm computes what it did. The modules
    keep their class's parameters and state_dict keys; a deepcopy keeps the change."""
    swapped = 0
    for m in unet.modules():
        for base, cls in ((torch.nn.GroupNorm, _AutocastGroupNorm), (torch.nn.LayerNorm, _AutocastLayerNorm)):
            if type(m) is base:
                m.__class__ = cls
                swapped += 1
    return swapped


def compile_blocks(unet: torch.nn.Module, **options) -> int:
    """Compile each repeated block of `unet` in place with torch.compile(**options); return how many.

    `Module.compile` keeps the module: state_dict keys gain no `_orig_mod.` prefix (checkpoints, export, DDP and
    FSDP see the same keys), and a deepcopy (G's EMA) comes out uncompiled, running its own weights."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                           4 * RECOMPILE_LIMIT)
    blocks = [m for m in unet.modules() if type(m).__name__ in REPEATED_BLOCKS]
    for m in blocks:
        m.compile(**options)
    return len(blocks)


def unet_logits(unet: torch.nn.Module) -> ScoreNet:
    """Return disc(x_t, t, c) -> logits [B, 1, h, w] for a UNet2DConditionModel: the channel mean of its mid-block
    output (method.md §6.2), so the fake score network is the discriminator with no new parameters. Only the
    encoder runs (time embedding, down blocks, mid block): the up path would cost more than half a forward."""
    config = unet.config
    p = _pooled_dim(config) if config.get("addition_embed_type") == "text_time" else None

    def disc(x_t: Tensor, t: Tensor, c: Tensor) -> Tensor:
        c = c.to(x_t.device)
        added = None
        if p is not None:  # SDXL's packed condition, unpacked as in score_net
            c, added = c[:, :-1], {"text_embeds": c[:, -1, :p], "time_ids": c[:, -1, p : p + 6]}
        emb = unet.time_embedding(unet.get_time_embed(sample=x_t, timestep=t), None)
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=c, added_cond_kwargs=added)
        emb = emb + aug if aug is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        h = unet.conv_in(x_t)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=c)
            else:
                h, _ = block(hidden_states=h, temb=emb)
        h = unet.mid_block(h, emb, encoder_hidden_states=c)
        return h.float().mean(dim=1, keepdim=True)  # [B, 1, h, w]

    return disc


def load_teacher(uri: str, device: str | torch.device = "cpu", cache_dir: str | None = None,
                 null: str = "auto", generator: bool = False) -> Teacher:
    """Load the teacher at `uri` (local path, file:// or s3://) in fp32, frozen, on `device`.

    `null` picks ∅: "empty" encodes "", "zeros" is a zero embedding, "auto" follows the pipeline's
    `force_zeros_for_empty_prompt` (true for SDXL, absent for SD1.5/2.1).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if null not in NULL_MODES:
        raise TeacherError(f"null={null!r} is not one of {list(NULL_MODES)}")
    path = materialize(uri, cache_dir)
    sched_cfg = check_teacher_dir(path, generator=generator)
    index = json.loads((Path(path) / "model_index.json").read_text())
    # An exported K-step generator's scheduler also records t_init; the tables need the betas only.
    scheduler = DDPMScheduler.from_config({**{k: v for k, v in sched_cfg.items() if k != "t_init"},
                                           "clip_sample": False})
    fp32 = {"torch_dtype": torch.float32}  # fp16-saved weights too: training keeps fp32 master copies
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **fp32).to(device)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **fp32).to(device)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **fp32).to(device)
    text_encoder_2 = tokenizer_2 = None
    if _is_sdxl(index):
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **fp32)
        text_encoder_2 = text_encoder_2.to(device)
        tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2")
    for m in (unet, text_encoder, vae, text_encoder_2):
        if m is not None:
            m.requires_grad_(False).eval()
    a, s = vp_tables(scheduler.alphas_cumprod)
    zeros = null == "zeros" or (null == "auto" and bool(index.get("force_zeros_for_empty_prompt", False)))
    return Teacher(path=path, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae,
                   scheduler_config=dict(scheduler.config), alphas_cumprod=scheduler.alphas_cumprod, a=a, s=s,
                   text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, null_zeros=zeros)
