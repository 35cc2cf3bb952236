"""Turns a captured state h and its adjoint p into per-token pairs (z, p) (METHOD.md section 3).

A state of shape (batch, d) is one token per sample, (batch, tokens, d) is a transformer stream and
(batch, C, H, W) is a feature map, where z is the (C*k*k)-long "same"-padded patch around each pixel.
In every case z gets a trailing 1 for the bias, so each output neuron owns one (q x q) block with q the
length of z.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

LAYOUTS = ("vector", "tokens", "channels")


def layout_of(state: torch.Tensor) -> str:
    if state.ndim == 2:
        return "vector"
    if state.ndim == 3:
        return "tokens"
    if state.ndim == 4:
        return "channels"
    raise ValueError(
        f"cannot insert a layer on a state of shape {tuple(state.shape)}: expected (batch, d), "
        "(batch, tokens, d) or (batch, channels, height, width)"
    )


def effective_kernel(kernel_size: int, height: int, width: int) -> int:
    """The conv kernel a layer on a (height x width) feature map gets: kernel_size, shrunk to 2 * max(height, width) - 1
    where the map is smaller. With 'same' padding a tap further than the map's extent from the centre reads only
    padding at every pixel, so its weights would never receive a gradient: on a 1 x 1 map (a CNN's last stage at a
    small input size) a 3 x 3 conv is its centre tap and eight dead ones, nine times the trainable parameters of
    the 1 x 1 conv that computes the same. No tap that some pixel reads is dropped (a 1 x 2 map keeps 3 x 3)."""
    return min(kernel_size, 2 * max(height, width) - 1)


def num_features(layout: str, width: int, kernel_size: int) -> int:
    """Length q of z for a state of the given width (d or C)."""
    return width * kernel_size * kernel_size + 1 if layout == "channels" else width + 1


def token_pairs(
    state: torch.Tensor, adjoint: torch.Tensor, kernel_size: int = 3, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns z of shape (N, q) and p of shape (N, d_out), one row per token (pixel, sample)."""
    layout = layout_of(state)
    state = state.detach().to(dtype)
    adjoint = adjoint.detach().to(dtype)
    if layout == "channels":
        if kernel_size % 2 != 1:
            raise ValueError(f"conv kernel_size must be odd for 'same' padding, got {kernel_size}")
        batch, channels = state.shape[:2]
        patches = F.unfold(state, kernel_size, padding=kernel_size // 2)  # (B, C*k*k, H*W)
        z = patches.transpose(1, 2).reshape(-1, channels * kernel_size * kernel_size)
        p = adjoint.flatten(2).transpose(1, 2).reshape(-1, channels)
    else:
        z = state.reshape(-1, state.shape[-1])
        p = adjoint.reshape(-1, adjoint.shape[-1])
    z = torch.cat([z, z.new_ones(z.shape[0], 1)], dim=1)
    return z, p
