"""Where to mix: pure functions for mixing ratios, boxes and per-token partner shares.

Mask generation is kept apart from label assignment so that any label rule (area, TransMix,
TL-Align, teacher maps) can be combined with any mask (box, token box, TokenMix blocks, SMMix
windows), as the papers' own ablations do.

Boxes are ``(top, bottom, left, right)`` half-open pixel (or token) ranges, i.e. timm's
``(yl, yh, xl, xh)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenmix.methods.base import TokenGrid

Box = tuple[int, int, int, int]


def sample_lam(alpha: float) -> float:
    """lam ~ Beta(alpha, alpha) drawn from torch's global RNG (so ``torch.manual_seed`` fixes it)."""
    if alpha <= 0:
        raise ValueError(f"a Beta concentration must be > 0, got {alpha}")
    a = torch.tensor(float(alpha))
    return float(torch.distributions.Beta(a, a).sample())


def rand_bbox(height: int, width: int, lam: float) -> Box:
    """A random box covering about ``1 - lam`` of a ``height x width`` area, with timm's rule.

    The sides are ``int(H * sqrt(1 - lam))`` and ``int(W * sqrt(1 - lam))``; the centre is uniform
    over the whole area; the box is ``centre -/+ side // 2`` clipped to the area, so an odd side
    loses one before clipping (7 -> 6), exactly as the ``rand_bbox`` of the timm versions the
    official TransMix / TL-Align code uses. (Recent timm, e.g. 1.0.31, ends the box at
    ``centre + (side + 1) // 2`` and keeps odd sides; even sides agree.)
    """
    ratio = (1.0 - lam) ** 0.5
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy = int(torch.randint(0, height, ()))
    cx = int(torch.randint(0, width, ()))
    top, bottom = min(max(cy - cut_h // 2, 0), height), min(max(cy + cut_h // 2, 0), height)
    left, right = min(max(cx - cut_w // 2, 0), width), min(max(cx + cut_w // 2, 0), width)
    return top, bottom, left, right


def box_lam(box: Box, height: int, width: int) -> float:
    """Own (kept) share of the area once ``box`` is pasted: ``1 - box area / (H W)`` (timm's
    corrected lam)."""
    top, bottom, left, right = box
    return 1.0 - (bottom - top) * (right - left) / float(height * width)


def box_token_share(box: Box, grid: TokenGrid) -> Tensor:
    """Share of each token's pixels covered by a pixel box.

    Args:
        box: pixel box (top, bottom, left, right).
        grid: the token grid.
    Returns:
        (N,) float32, row-major over the grid; sums to the box area / patch area.
    """
    top, bottom, left, right = box
    rows = torch.arange(grid.rows, dtype=torch.float32)
    cols = torch.arange(grid.cols, dtype=torch.float32)
    # overlap of [top, bottom) with each token row [r*ph, (r+1)*ph), as a fraction of ph
    oy = ((torch.minimum(torch.tensor(float(bottom)), (rows + 1) * grid.patch_h)
           - torch.maximum(torch.tensor(float(top)), rows * grid.patch_h)).clamp_min(0) / grid.patch_h)
    ox = ((torch.minimum(torch.tensor(float(right)), (cols + 1) * grid.patch_w)
           - torch.maximum(torch.tensor(float(left)), cols * grid.patch_w)).clamp_min(0) / grid.patch_w)
    return (oy[:, None] * ox[None, :]).reshape(-1)  # (rows*cols,)


def token_mask_to_pixels(token_mask: Tensor, grid: TokenGrid) -> Tensor:
    """Nearest upsampling of a token mask (B, N) to pixels (B, 1, H, W)."""
    b = token_mask.shape[0]
    m = token_mask.reshape(b, 1, grid.rows, grid.cols)
    return m.repeat_interleave(grid.patch_h, dim=2).repeat_interleave(grid.patch_w, dim=3)


def pixel_mask_token_share(pixel_mask: Tensor, grid: TokenGrid) -> Tensor:
    """Share of each token covered by a pixel mask: (B, 1, H, W) or (B, H, W) -> (B, N)."""
    m = pixel_mask.float()
    if m.dim() == 3:
        m = m.unsqueeze(1)
    share = F.avg_pool2d(m, kernel_size=(grid.patch_h, grid.patch_w))  # (B, 1, rows, cols)
    return share.flatten(1)


def paste_box(x: Tensor, x_partner: Tensor, box: Box) -> Tensor:
    """Copy ``x_partner[..., box]`` into a clone of ``x``; x, x_partner (B, C, H, W)."""
    top, bottom, left, right = box
    out = x.clone()
    out[:, :, top:bottom, left:right] = x_partner[:, :, top:bottom, left:right]
    return out


def paste_token_mask(x: Tensor, x_partner: Tensor, token_mask: Tensor, grid: TokenGrid) -> Tensor:
    """Replace whole patches where ``token_mask`` (B, N) is 1 by the partner's patches."""
    m = token_mask_to_pixels(token_mask.to(x.dtype), grid)  # (B, 1, H, W)
    return x * (1 - m) + x_partner * m
