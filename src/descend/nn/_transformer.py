"""A small causal transformer language model (GPT-style, pre-norm, tied input/output embeddings).

Tokens ``idx [B, T]`` (integers in ``[0, vocab)``) become ``logits [B, T, vocab]``, the logits at
position ``t`` predicting token ``t + 1``. With ``h_0 = E[idx] + P[0:T]`` (token and learned position
embeddings), each of ``depth`` blocks computes

    h ← h + Attn(LN₁(h)),   Attn = W_o · concat_heads softmax(q kᵀ / √D + M_causal) v
    h ← h + W₂ GELU(W₁ LN₂(h))

(``M_causal`` is ``-inf`` above the diagonal: position ``t`` sees positions ``≤ t`` only), and the
output is ``logits = LN_f(h) Eᵀ``: the output projection *is* the token embedding (weight tying).
Attention is :func:`torch.nn.functional.scaled_dot_product_attention` with ``is_causal=True``.
:meth:`TransformerLM.generate` samples a continuation token by token, keeping each block's keys and
values (a KV cache) so a new token costs one position's work, not the whole sequence's.
Seen from :mod:`descend.nn`'s point sets, a sequence is a set of (position: value) points and the
causal mask restricts each point to the ones before it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from descend.nn._checkpoint import run_block

__all__ = ["CausalSelfAttention", "KVCache", "TransformerBlock", "TransformerLM", "sample_next"]


class KVCache:
    """The keys and values every attention layer has seen so far: one ``(k, v)`` pair ``[B, H, S, D]`` a layer.

    :meth:`CausalSelfAttention.forward` appends the new positions' keys and values to its layer's pair and
    attends over all of them; ``length`` is the number of positions held (the position of the next token).
    """

    def __init__(self, layers: int) -> None:
        self.pairs: list[tuple[Tensor, Tensor] | None] = [None] * layers
        self.length = 0

    def extend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k, v [B, H, T, D]`` to ``layer``'s pair and return the whole pair."""
        held = self.pairs[layer]
        if held is not None:
            k, v = torch.cat([held[0], k], dim=2), torch.cat([held[1], v], dim=2)
        self.pairs[layer] = (k, v)
        return k, v


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention ``x [B, T, W] -> [B, T, W]`` (``heads`` must divide ``W``)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if heads < 1 or width % heads:
            raise ValueError(f"heads={heads!r}: must be >= 1 and divide width={width}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        """``x [B, T, W]``; with ``cache``, ``x`` holds the positions after the ``cache.length`` ones it holds."""
        B, T, W = x.shape
        H = self.heads
        q, k, v = self.qkv(x).view(B, T, 3, H, W // H).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, D) each
        past = 0 if cache is None else cache.length
        if cache is not None:
            k, v = cache.extend(layer, k, v)  # (B, H, past + T, D)
        if past == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        else:  # query i sits at position past + i and sees keys 0 .. past + i
            seen = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=seen)
        return self.out(o.transpose(1, 2).reshape(B, T, W))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h + Attn(LN(h))``, then ``h + MLP(LN(h))`` with a ``mlp_ratio · W`` hidden layer."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        x = x + self.attn(self.norm1(x), cache, layer)
        return x + self.mlp(self.norm2(x))


class TransformerLM(nn.Module):
    """Causal language model ``idx [B, T] (T <= context) -> logits [B, T, vocab]``; see the module docstring.

    Initialisation (GPT-2): weights ``N(0, 0.02²)``, biases 0, and the two projections that write into
    the residual stream (``attn.out``, the MLP's second layer) scaled by ``1/√(2·depth)`` so the
    stream's variance does not grow with depth. At initialisation the loss is close to ``ln(vocab)``.
    ``checkpoint=True`` recomputes each block's activations in the backward pass instead of storing
    them (:mod:`descend.nn._checkpoint`): the same gradients for less activation memory.
    """

    def __init__(self, vocab: int = 256, context: int = 128, *, width: int = 64, depth: int = 2, heads: int = 4,
                 mlp_ratio: int = 4, checkpoint: bool = False) -> None:
        super().__init__()
        self.checkpoint = checkpoint
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

    def forward(self, idx: Tensor, cache: KVCache | None = None) -> Tensor:
        """``idx [B, T] -> logits [B, T, vocab]``; with ``cache``, ``idx`` continues the positions it holds."""
        T = idx.shape[-1]
        start = 0 if cache is None else cache.length
        if start + T > self.context:
            raise ValueError(f"sequence length {start + T} exceeds the model's context {self.context}")
        h = self.embed(idx) + self.position[start : start + T]  # (B, T, W)
        for layer, block in enumerate(self.blocks):
            h = run_block(block, h, cache, layer, recompute=self.checkpoint and cache is None)
        if cache is not None:
            cache.length += T
        return self.norm(h) @ self.embed.weight.T  # (B, T, vocab): tied output projection

    @torch.no_grad()
    def generate(self, idx: Tensor, tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> Tensor:
        """Sample ``tokens`` new tokens after the prompt ``idx [B, T]``; returns ``[B, T + tokens]``.

        Each new token is drawn by :func:`sample_next` from the logits at the last position, given at most
        the last ``context`` tokens: a longer prompt (or text) is conditioned on its last ``context``
        tokens only. With ``use_cache`` the keys and values of the tokens seen are kept (:class:`KVCache`)
        while the text fits the context; past it, every position shifts, so each new token reads the
        last ``context`` tokens again, as without the cache. Both give the same text for the same
        ``generator`` (up to float rounding of the logits, which can only flip a draw that falls within
        that rounding of a boundary). Evaluation mode is used while sampling and the mode restored after.
        """
        return torch.cat([idx, *self.stream(idx, tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                             generator=generator, use_cache=use_cache)], dim=1)

    @torch.no_grad()
    def stream(self, idx: Tensor, tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None,
               use_cache: bool = True) -> Iterator[Tensor]:
        """:meth:`generate` one token at a time: yields each new token as ``[B, 1]`` as soon as it is drawn."""
        if idx.dim() != 2 or idx.shape[1] < 1:
            raise ValueError(f"the prompt must be token ids [B, T] with T >= 1, got shape {tuple(idx.shape)}")
        if tokens < 0:
            raise ValueError(f"tokens={tokens}: must be >= 0")
        was_training = self.training
        self.eval()
        try:
            text = idx[:, -self.context :]
            cache = KVCache(len(self.blocks)) if use_cache else None
            logits = self(text, cache)[:, -1]
            for i in range(tokens):
                new = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
                yield new
                if i == tokens - 1:
                    break
                text = torch.cat([text, new], dim=1)[:, -self.context :]
                if cache is not None and cache.length < self.context:
                    logits = self(new, cache)[:, -1]
                else:  # no cache, or the context is full: the positions shift, so read the window again
                    logits = self(text)[:, -1]
        finally:
            self.train(was_training)


def sample_next(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """One token per row from ``logits [B, vocab]``: ``[B, 1]`` int64.

    ``temperature`` 0 takes the most likely token; otherwise the distribution is
    ``softmax(logits / temperature)``, restricted to the ``top_k`` most likely tokens and then to the
    smallest set of most likely tokens whose probability reaches ``top_p`` (nucleus sampling), and
    renormalised. ``generator`` makes the draw reproducible.
    """
    if temperature < 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature={temperature}: must be a finite number >= 0 (0 takes the most likely token)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k}: must be >= 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: must be in (0, 1]")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if top_p is not None and top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the most likely token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)
