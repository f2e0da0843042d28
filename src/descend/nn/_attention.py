"""Attention blocks over sets of points, all built on ``F.scaled_dot_product_attention``.

A set is ``tokens [B, N, W]`` with an optional ``mask [B, N]`` (bool, ``True`` = a real point).
Masked (padding) tokens are never used as keys, and every block writes zeros at padded positions,
so padding cannot leak into anything. A set with no real point at all attends uniformly over its
(zeroed) padding tokens, which gives a finite output that does not depend on the padding.

Every block attends through :class:`MultiheadAttention` (``D = W / heads`` channels a head), whose
mask ``M`` is ``-inf`` at masked keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def key_mask(mask: Tensor | None) -> Tensor | None:
    """``mask [B, N] -> [B, 1, 1, N]`` for SDPA; a set with no real point lets every key through."""
    if mask is None:
        return None
    empty = ~mask.any(dim=-1, keepdim=True)
    return (mask | empty)[:, None, None, :]


def zero_padding(tokens: Tensor, mask: Tensor | None) -> Tensor:
    """``tokens [B, N, W]`` with the rows where ``mask`` is False set to exactly zero."""
    if mask is None:
        return tokens
    return torch.where(mask[..., None], tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device))


class MultiheadAttention(nn.Module):
    """Multi-head attention ``queries [B, Q, W], keys [B, N, W], key_mask [B, N] -> [B, Q, W]``.

    ``out = W_o concat_h softmax(q_h k_h^T / sqrt(D) + M) v_h`` with ``q = W_q queries``,
    ``(k, v) = (W_k keys, W_v keys)``. Memory is ``O(B heads Q N)`` at most (less when SDPA picks a
    fused kernel); with ``Q`` fixed and small (inducing points, pooling seeds) it is linear in ``N``.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if heads < 1 or width % heads:
            raise ValueError(f"heads={heads!r}: must be >= 1 and divide width={width}")
        self.width, self.heads = width, heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, queries: Tensor, keys: Tensor, key_mask_: Tensor | None = None) -> Tensor:
        B, Q, W = queries.shape
        N = keys.shape[1]
        H, D = self.heads, W // self.heads
        q = self.q(queries).view(B, Q, H, D).transpose(1, 2)  # (B, H, Q, D)
        k, v = self.kv(keys).view(B, N, 2, H, D).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D) each
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask(key_mask_))
        return self.out(o.transpose(1, 2).reshape(B, Q, W))


class FeedForward(nn.Sequential):
    """Position-wise ``[..., W] -> Linear(W, mult W) -> GELU -> Linear(mult W, W) -> [..., W]``."""

    def __init__(self, width: int, mult: int = 2) -> None:
        super().__init__(nn.Linear(width, mult * width), nn.GELU(), nn.Linear(mult * width, width))


class SelfAttentionBlock(nn.Module):
    """Pre-norm transformer block on a set: ``[B, N, W] -> [B, N, W]``, cost ``O(N^2)``.

    ``x <- x + MHA(LN(x), LN(x))``, ``x <- x + FF(LN(x))``; permutation-equivariant.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(width)
        self.attn = MultiheadAttention(width, heads)
        self.norm_ff = nn.LayerNorm(width)
        self.ff = FeedForward(width)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = self.norm_attn(x)
        x = x + self.attn(h, h, mask)
        x = x + self.ff(self.norm_ff(x))
        return zero_padding(x, mask)


class InducedAttentionBlock(nn.Module):
    """Induced-point attention: ``[B, N, W] -> [B, N, W]`` at cost ``O(m N)``, ``m`` inducing points.

    A learned set ``I [m, W]`` first summarises the points, ``H = I + MHA(LN(I), LN(x))``,
    ``H <- H + FF(LN(H))``; then the points read the summary, ``x <- x + MHA(LN(x), LN(H))``,
    ``x <- x + FF(LN(x))``. No ``N x N`` matrix is formed; permutation-equivariant.
    """

    def __init__(self, width: int, heads: int, inducing_points: int) -> None:
        super().__init__()
        if inducing_points < 1:
            raise ValueError(f"inducing_points={inducing_points!r}: expected a positive integer or None")
        self.inducing = nn.Parameter(torch.randn(inducing_points, width) / math.sqrt(width))
        self.norm_i, self.norm_x1 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.summarise = MultiheadAttention(width, heads)
        self.norm_h, self.ff_h = nn.LayerNorm(width), FeedForward(width)
        self.norm_x2, self.norm_s = nn.LayerNorm(width), nn.LayerNorm(width)
        self.broadcast = MultiheadAttention(width, heads)
        self.norm_ff, self.ff = nn.LayerNorm(width), FeedForward(width)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        inducing = self.inducing.expand(x.shape[0], -1, -1)  # (B, m, W)
        h = inducing + self.summarise(self.norm_i(inducing), self.norm_x1(x), mask)
        h = h + self.ff_h(self.norm_h(h))
        x = x + self.broadcast(self.norm_x2(x), self.norm_s(h))
        x = x + self.ff(self.norm_ff(x))
        return zero_padding(x, mask)


class AttentionPooling(nn.Module):
    """Pooling by attention: ``[B, N, W] -> [B, seeds, W]``, permutation-invariant, cost ``O(seeds N)``.

    Learned seed vectors ``S`` attend to the set: ``P = S + MHA(LN(S), LN(x))``, ``P <- P + FF(LN(P))``.
    """

    def __init__(self, width: int, heads: int, seeds: int = 1) -> None:
        super().__init__()
        self.seeds = nn.Parameter(torch.randn(seeds, width) / math.sqrt(width))
        self.norm_s, self.norm_x = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = MultiheadAttention(width, heads)
        self.norm_ff, self.ff = nn.LayerNorm(width), FeedForward(width)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        seeds = self.seeds.expand(x.shape[0], -1, -1)
        p = seeds + self.attn(self.norm_s(seeds), self.norm_x(x), mask)
        return p + self.ff(self.norm_ff(p))


class CrossAttentionBlock(nn.Module):
    """Queries read a context set: ``q [B, Q, W], context [B, N, W], mask [B, N] -> [B, Q, W]``.

    ``q <- q + MHA(LN(q), LN(context))``, ``q <- q + FF(LN(q))``. Queries do not see each other, so
    each prediction depends on its own query and the context only (equivariant in the queries,
    invariant in the context order).
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm_q, self.norm_c = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = MultiheadAttention(width, heads)
        self.norm_ff, self.ff = nn.LayerNorm(width), FeedForward(width)

    def forward(self, q: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        q = q + self.attn(self.norm_q(q), self.norm_c(context), mask)
        return q + self.ff(self.norm_ff(q))


class PointEmbedding(nn.Module):
    """Embed each point's location and value together: ``[B, N, d_loc], [B, N, d_val] -> [B, N, W]``.

    ``location_embedding="fourier"``: ``phi(x) = [x, sin(2 pi x B), cos(2 pi x B)]`` with fixed
    frequencies ``B [d_loc, F] ~ N(0, scale^2)``; ``"learned"``: ``phi(x) = x``. The token is then
    ``Linear(W) -> GELU -> Linear(W)`` of ``[phi(x), value]``. ``value_dim = 0`` embeds bare
    locations (decoder queries).
    """

    def __init__(self, location_dim: int, value_dim: int, width: int, location_embedding: str = "fourier",
                 fourier_features: int = 32, fourier_scale: float = 1.0) -> None:
        super().__init__()
        if location_embedding not in ("fourier", "learned"):
            raise ValueError(
                f"location_embedding={location_embedding!r} is not supported; "
                "expected one of ('fourier', 'learned')"
            )
        self.location_dim, self.value_dim = location_dim, value_dim
        self.fourier = location_embedding == "fourier"
        features = location_dim + value_dim
        if self.fourier:
            self.register_buffer("frequencies", torch.randn(location_dim, fourier_features) * fourier_scale)
            features += 2 * fourier_features
        self.mlp = nn.Sequential(nn.Linear(features, width), nn.GELU(), nn.Linear(width, width))

    def forward(self, locations: Tensor, values: Tensor | None = None) -> Tensor:
        parts = [locations]
        if self.fourier:
            angles = 2 * math.pi * locations @ self.frequencies
            parts += [angles.sin(), angles.cos()]
        if values is not None:
            parts.append(values)
        return self.mlp(torch.cat(parts, dim=-1))


__all__ = [
    "AttentionPooling",
    "CrossAttentionBlock",
    "FeedForward",
    "InducedAttentionBlock",
    "MultiheadAttention",
    "PointEmbedding",
    "SelfAttentionBlock",
    "key_mask",
    "zero_padding",
]
