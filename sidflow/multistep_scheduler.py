"""The diffusers scheduler of an exported K-step generator (method.md §2, §6.1); it imports only torch and diffusers.

The export copies this file into the pipeline's scheduler/ folder, so `DiffusionPipeline.from_pretrained(dir,
trust_remote_code=True)` loads it without sidflow installed. With K inference steps it samples as
sidflow.method.sid.generate does: the latents start as s_{t_0}·z, step j predicts x0 = (x − s_j ε̂)/a_j at
t_j = ⌊t_init (K − j)/K⌋ and re-noises it to t_{j+1} with fresh noise from the pipeline's generator; the last step
returns x0. Called with one `torch.Generator` per image, it draws what `sidflow generate` draws for that seed.
"""

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor


class SiDMultistepScheduler(SchedulerMixin, ConfigMixin):
    """x0 prediction and fresh re-noising at t_j = ⌊t_init (K − j)/K⌋, j = 0..K−1, for ε-prediction UNets."""

    order = 1

    @register_to_config
    def __init__(self, trained_betas: list[float], t_init: int = 625, num_train_timesteps: int = 626,
                 prediction_type: str = "epsilon"):
        # The teacher's betas for t ≤ t_init; ᾱ as DDPMScheduler computes it, then the tables as sidflow does:
        # a = sqrt(ᾱ), s = sqrt(1 − ᾱ) in float64, stored in float32.
        acp = torch.cumprod(1.0 - torch.tensor(trained_betas, dtype=torch.float32), dim=0).double()
        self.a, self.s = acp.sqrt().float(), (1 - acp).sqrt().float()
        self.init_noise_sigma = self.s[t_init]  # the pipeline's latents become s_{t_0}·z
        self.set_timesteps(1)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None, **_):
        k = num_inference_steps
        if not 1 <= k <= self.config.t_init:
            raise ValueError(f"num_inference_steps={k} must be between 1 and t_init={self.config.t_init}")
        self.num_inference_steps = k
        self.timesteps = torch.tensor([self.config.t_init * (k - j) // k for j in range(k)], dtype=torch.long,
                                      device=device)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | list[torch.Generator] | None = None, return_dict: bool = True):
        t = int(timestep)
        j = int((self.timesteps.cpu() == t).nonzero()[0, 0])
        a, s = self.a[t].to(sample.device), self.s[t].to(sample.device)
        x0 = (sample - s * model_output.to(sample.dtype)) / a
        if j == len(self.timesteps) - 1:
            prev = x0
        else:
            nxt = int(self.timesteps[j + 1])
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev = self.a[nxt].to(sample.device) * x0 + self.s[nxt].to(sample.device) * noise
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
