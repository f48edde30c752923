"""The Control DiT: a trainable copy of the base DiT's first K blocks that steers it through zero Linears."""

from __future__ import annotations

import copy

import torch
from diffusers import DiTTransformer2DModel
from torch import nn

from delinea.models import dit as dit_ops


class ControlDiT(nn.Module):
    """K copied DiT blocks over ``Z_ct = concat(Z_mt, zero_conv(Z_o))``, one zero Linear per block.

    Initialisation guarantees that the steered DiT's output equals the base DiT's exactly: every residual passes
    through a zero Linear, and the ``Z_o`` half of the patch embedding starts at zero (the ``Z_mt`` half is the
    base patch embedding). The image latent enters through a 1x1 conv (the paper's zero conv) that starts as
    the identity: were it zero as well, conv and patch weights would each get a zero gradient through the other
    forever and the model would never see the image. Starting the wide patch weights at zero rather than the
    4x4 conv also lets the image signal grow fast: every patch weight learns at once.

    Args:
        base: the frozen base DiT to copy blocks and patch embedding from.
        num_blocks: K, the number of copied blocks (1 <= K <= number of base blocks).
    """

    def __init__(self, base: DiTTransformer2DModel, num_blocks: int) -> None:
        super().__init__()
        depth = len(base.transformer_blocks)
        if not 1 <= num_blocks <= depth:
            raise ValueError(f"control_blocks K={num_blocks} must be between 1 and the base DiT's {depth} blocks")
        channels = base.config.in_channels
        hidden = base.inner_dim
        self.zero_conv = nn.Conv2d(channels, channels, kernel_size=1)
        with torch.no_grad():
            self.zero_conv.weight.copy_(torch.eye(channels)[:, :, None, None])  # identity (see above)
            nn.init.zeros_(self.zero_conv.bias)  # type: ignore[arg-type]  # built with a bias
        self.patch_embed = copy.deepcopy(base.pos_embed)
        old = base.pos_embed.proj
        self.patch_embed.proj = nn.Conv2d(2 * channels, hidden, old.kernel_size, old.stride)
        with torch.no_grad():
            self.patch_embed.proj.weight.zero_()  # Z_o half: zero, Z_o starts silent
            self.patch_embed.proj.weight[:, :channels].copy_(old.weight)  # Z_mt half: the base's
            self.patch_embed.proj.bias.copy_(old.bias)
        self.blocks = nn.ModuleList(copy.deepcopy(base.transformer_blocks[i]) for i in range(num_blocks))
        for block in self.blocks:
            # The copies get the label the caller chose, never a randomly dropped one.
            block.norm1.emb.class_embedder.dropout_prob = 0.0  # type: ignore[union-attr]  # a diffusers block
        self.zero_linears = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(num_blocks))
        for linear in self.zero_linears:
            assert isinstance(linear, nn.Linear)
            nn.init.zeros_(linear.weight)  # zero-initialised: no control at step 0
            nn.init.zeros_(linear.bias)

    def forward(
        self,
        noisy_mask_latent: torch.Tensor,
        image_latent: torch.Tensor,
        timestep: torch.Tensor,
        class_labels: torch.Tensor,
        checkpoint: bool = False,
    ) -> list[torch.Tensor]:
        """Residuals for base blocks 0..K-1: (N, C, h, w) x 2 -> K x (N, T, D); ``checkpoint`` recomputes each
        block's activations in the backward pass instead of keeping them."""
        z_ct = torch.cat([noisy_mask_latent, self.zero_conv(image_latent)], dim=1)  # (N, 2C, h, w)
        hidden = self.patch_embed(z_ct)  # (N, T, D)
        residuals = []
        for block, zero_linear in zip(self.blocks, self.zero_linears):
            hidden = dit_ops.run_block(block, hidden, timestep, class_labels, checkpoint)
            residuals.append(zero_linear(hidden))  # (N, T, D)
        return residuals
