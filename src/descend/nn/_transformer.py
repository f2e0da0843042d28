"""A small causal transformer language model (GPT-style, pre-norm, tied input/output embeddings).

Tokens ``idx [B, T]`` (integers in ``[0, vocab)``) become ``logits [B, T, vocab]``, the logits at
position ``t`` predicting token ``t + 1``. With ``h_0 = E[idx] + P[0:T]`` (token and learned position
embeddings), each of ``depth`` blocks computes

    h ← h + Attn(LN₁(h)),   Attn = W_o · concat_heads softmax(q kᵀ / √D + M_causal) v
    h ← h + W₂ GELU(W₁ LN₂(h))

(``M_causal`` is ``-inf`` above the diagonal: position ``t`` sees positions ``≤ t`` only), and the
output is ``logits = LN_f(h) Eᵀ``: the output projection *is* the token embedding (weight tying).
Attention is :func:`torch.nn.functional.scaled_dot_product_attention` with ``is_causal=True``.
Seen from :mod:`descend.nn`'s point sets, a sequence is a set of (position: value) points and the
causal mask restricts each point to the ones before it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CausalSelfAttention", "TransformerBlock", "TransformerLM"]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention ``x [B, T, W] -> [B, T, W]`` (``heads`` must divide ``W``)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if heads < 1 or width % heads:
            raise ValueError(f"heads={heads!r}: must be >= 1 and divide width={width}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        B, T, W = x.shape
        H = self.heads
        q, k, v = self.qkv(x).view(B, T, 3, H, W // H).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, D) each
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        return self.out(o.transpose(1, 2).reshape(B, T, W))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h + Attn(LN(h))``, then ``h + MLP(LN(h))`` with a ``mlp_ratio · W`` hidden layer."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerLM(nn.Module):
    """Causal language model ``idx [B, T] (T <= context) -> logits [B, T, vocab]``; see the module docstring.

    Initialisation (GPT-2): weights ``N(0, 0.02²)``, biases 0, and the two projections that write into
    the residual stream (``attn.out``, the MLP's second layer) scaled by ``1/√(2·depth)`` so the
    stream's variance does not grow with depth. At initialisation the loss is close to ``ln(vocab)``.
    """

    def __init__(
        self,
        vocab: int = 256,
        context: int = 128,
        *,
        width: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 4,
    ) -> None:
        super().__init__()
        if vocab < 2 or context < 1 or depth < 1 or width < 1:
            raise ValueError(f"need vocab >= 2, context, depth, width >= 1; got {vocab}, {context}, {depth}, {width}")
        self.vocab, self.context = vocab, context
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self._init(depth)

    def _init(self, depth: int) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.position, std=0.02)
        for block in self.blocks:
            assert isinstance(block, TransformerBlock)
            for proj in (block.attn.out, block.mlp[2]):
                assert isinstance(proj, nn.Linear)
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * depth))

    def forward(self, idx: Tensor) -> Tensor:
        T = idx.shape[-1]
        if T > self.context:
            raise ValueError(f"sequence length {T} exceeds the model's context {self.context}")
        h = self.embed(idx) + self.position[:T]  # (B, T, W)
        for block in self.blocks:
            h = block(h)
        return self.norm(h) @ self.embed.weight.T  # (B, T, vocab): tied output projection
