"""The Diffusion-GAN term of few-step SiD with real data (method.md §6.2).

The discriminator is the fake score network's encoder, no new parameters: `disc(x_t, t, c)` returns a logit map
[B, ...] (for a UNet the channel mean of the mid-block output). Real and generated samples are noised with the same
t and ε, the logits are clamped to ±10 and each binary cross-entropy is a per-sample mean over the map, scaled by
the number of elements of one sample (C·H·W) so that the term is on the scale of the per-sample SiD losses.
"""

import torch.nn.functional as F
from torch import Tensor

from sidflow.method.guidance import ScoreNet
from sidflow.method.vp import VP, add_noise

LOGIT_CLAMP = 10.0


def _bce(logits: Tensor, target: float) -> Tensor:
    # Per-sample mean over the logit map of BCE(clamp(ℓ), target), shape [B].
    clamped = logits.float().clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
    return F.binary_cross_entropy_with_logits(clamped, clamped.new_full(clamped.shape, target),
                                              reduction="none").flatten(1).mean(1)


def discriminator_loss(logits_real: Tensor, logits_fake: Tensor, *, scale: float) -> Tensor:
    """Return L_D per sample [B]: ½ (BCE(ℓ_real, 1) + BCE(ℓ_fake, 0)) · scale (λ_D is applied by the loop)."""
    return 0.5 * (_bce(logits_real, 1.0) + _bce(logits_fake, 0.0)) * scale


def adversarial_loss(logits_g: Tensor, w: Tensor, *, scale: float) -> Tensor:
    """Return L_adv per sample [B]: BCE(ℓ_g, 1) · scale / w, w the SiD normaliser (detached; λ_adv by the loop)."""
    return _bce(logits_g, 1.0) * scale / w


def disc_step_loss(disc: ScoreNet, x_g: Tensor, c: Tensor, x_real: Tensor, c_real: Tensor, t: Tensor, eps: Tensor,
                   vp: VP) -> Tensor:
    """Return L_D [B] for the fake-score step: real latents and generator samples (no grad to G) noised with the
    same t and ε, each scored with its own text condition (the GAN branch is conditional in every guidance mode)."""
    a_t, s_t = vp.at(t, x_g)
    real = disc(add_noise(x_real, eps, a_t, s_t), t, c_real)
    fake = disc(add_noise(x_g.detach(), eps, a_t, s_t), t, c)
    return discriminator_loss(real, fake, scale=x_g[0].numel())


def generator_adv_loss(disc: ScoreNet, x_t: Tensor, t: Tensor, c: Tensor, w: Tensor) -> Tensor:
    """Return L_adv [B] at the generator step's noised sample x_t (from sid.generator_step_terms, so the gradient
    reaches x_g through the discriminator) with the SiD normaliser w of the same samples."""
    return adversarial_loss(disc(x_t, t, c), w, scale=x_t[0].numel())
