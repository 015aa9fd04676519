"""Reference linear cross-entropy in plain JAX: vocabulary projection, log-softmax and NLL.

``x`` [..., d_model] (the final-norm output), ``w`` [d_model, vocab], ``targets`` [...] int. Returns the per-token
loss [...] in float32: ``logsumexp(logits) - logits[target] + z_loss_weight * logsumexp(logits)**2``. The caller
applies the loss mask and reduces. This materializes the full logits, which the fused kernels avoid. A target
outside [0, vocab) (an ignore index such as -100 under a zero mask weight) contributes a target logit of 0, as in
every fused implementation, so masking it out gives the same finite sum whichever implementation ``auto`` picks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(x, w, targets, *, z_loss_weight: float = 0.0):
    logits = jnp.einsum("...d,dv->...v", x, w, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    vocab = logits.shape[-1]
    targets = targets.astype(jnp.int32)
    target_logit = jnp.take_along_axis(logits, jnp.clip(targets, 0, vocab - 1)[..., None], axis=-1)[..., 0]
    loss = lse - jnp.where((targets >= 0) & (targets < vocab), target_logit, 0.0)
    if z_loss_weight:
        loss = loss + z_loss_weight * jnp.square(lse)
    return loss
