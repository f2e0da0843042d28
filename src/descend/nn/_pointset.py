"""Transformers over point sets: a set classifier/regressor and a context-to-query decoder.

A point set is ``locations [B, N, d_loc]``, ``values [B, N, d_val]`` and an optional
``mask [B, N]`` (bool, ``True`` = real point), so sets of different sizes batch together by
padding. Outputs never depend on padded points nor on the order of the points.
"""

from __future__ import annotations

from torch import Tensor, nn

from ._attention import (
    AttentionPooling,
    CrossAttentionBlock,
    InducedAttentionBlock,
    PointEmbedding,
    SelfAttentionBlock,
    zero_padding,
)


def _check_set(locations: Tensor, values: Tensor, mask: Tensor | None, d_loc: int, d_val: int) -> Tensor | None:
    if locations.dim() != 3 or locations.shape[-1] != d_loc:
        raise ValueError(f"locations must be [B, N, {d_loc}], got {tuple(locations.shape)}")
    if values.dim() != 3 or values.shape[:2] != locations.shape[:2] or values.shape[-1] != d_val:
        raise ValueError(f"values must be [B, N, {d_val}] matching locations, got {tuple(values.shape)}")
    if mask is None:
        return None
    if mask.shape != locations.shape[:2]:
        raise ValueError(f"mask must be [B, N] = {tuple(locations.shape[:2])}, got {tuple(mask.shape)}")
    return mask if mask.dtype == bool else mask > 0.5


class PointSetEncoder(nn.Module):
    """``(locations, values, mask) -> tokens [B, N, width]``: embedding then ``depth`` attention blocks.

    Blocks are full self-attention (``O(N^2)``) or, with ``inducing_points = m``, induced-point
    attention (``O(m N)``). Permutation-equivariant; padded rows of the output are exactly zero.
    """

    def __init__(self, location_dim: int, value_dim: int, width: int = 64, depth: int = 2, heads: int = 4,
                 inducing_points: int | None = None, location_embedding: str = "fourier", fourier_features: int = 32,
                 fourier_scale: float = 1.0) -> None:
        super().__init__()
        for name, value in (("location_dim", location_dim), ("value_dim", value_dim), ("width", width)):
            if value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        if depth < 0:
            raise ValueError(f"depth={depth!r}: expected an integer >= 0")
        self.location_dim, self.value_dim = location_dim, value_dim
        self.embed = PointEmbedding(location_dim, value_dim, width, location_embedding, fourier_features, fourier_scale)
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(width, heads) if inducing_points is None
            else InducedAttentionBlock(width, heads, inducing_points)
            for _ in range(depth)
        )

    def forward(self, locations: Tensor, values: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Returns ``(tokens [B, N, width], mask [B, N] as bool or None)``."""
        mask = _check_set(locations, values, mask, self.location_dim, self.value_dim)
        # zero the raw padding too, so non-finite padding cannot reach even a gradient
        x = self.embed(zero_padding(locations, mask), zero_padding(values, mask))
        x = zero_padding(x, mask)
        for block in self.blocks:
            x = block(x, mask)
        return x, mask


class PointSetTransformer(nn.Module):
    """A transformer from a point set to one output vector: ``model(locations, values, mask) -> [B, out]``.

    ``locations [B, N, location_dim]``, ``values [B, N, value_dim]``, ``mask [B, N]`` (optional) ->
    encoder (``depth`` self-attention or induced-point blocks, ``heads`` heads, ``width`` channels) ->
    attention pooling to one vector -> ``LayerNorm -> Linear`` -> ``[B, out_features]`` (class logits or
    regression outputs). Invariant to the order of the points and to padding;
    :meth:`encode` gives the permutation-equivariant per-point features ``[B, N, width]``.
    """

    def __init__(self, location_dim: int, value_dim: int, out_features: int, width: int = 64, depth: int = 2,
                 heads: int = 4, inducing_points: int | None = None, location_embedding: str = "fourier",
                 fourier_features: int = 32, fourier_scale: float = 1.0) -> None:
        super().__init__()
        self.encoder = PointSetEncoder(
            location_dim, value_dim, width, depth, heads, inducing_points,
            location_embedding, fourier_features, fourier_scale,
        )
        self.pool = AttentionPooling(width, heads, seeds=1)
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, out_features))

    def encode(self, locations: Tensor, values: Tensor, mask: Tensor | None = None) -> Tensor:
        """Per-point features ``[B, N, width]``, zero at padded points."""
        return self.encoder(locations, values, mask)[0]

    def forward(self, locations: Tensor, values: Tensor, mask: Tensor | None = None) -> Tensor:
        tokens, mask = self.encoder(locations, values, mask)
        return self.head(self.pool(tokens, mask)[:, 0])  # (B, out_features)


class PointSetDecoder(nn.Module):
    """Predict values at query locations from a context set (a neural-process style decoder).

    ``model(context_locations [B, N, location_dim], context_values [B, N, value_dim],
    context_mask [B, N] or None, query_locations [B, Q, location_dim]) -> [B, Q, out_features]``.

    The context is encoded as in :class:`PointSetTransformer`; each query location is embedded on its
    own and reads the context through ``depth`` cross-attention blocks, then ``LayerNorm -> Linear``.
    Predictions are invariant to the order (and padding) of the context and equivariant in the queries:
    a query's prediction does not depend on the other queries.
    """

    def __init__(self, location_dim: int, value_dim: int, out_features: int, width: int = 64, depth: int = 2,
                 heads: int = 4, inducing_points: int | None = None, location_embedding: str = "fourier",
                 fourier_features: int = 32, fourier_scale: float = 1.0) -> None:
        super().__init__()
        self.encoder = PointSetEncoder(
            location_dim, value_dim, width, depth, heads, inducing_points,
            location_embedding, fourier_features, fourier_scale,
        )
        self.query_embed = PointEmbedding(location_dim, 0, width, location_embedding, fourier_features, fourier_scale)
        self.blocks = nn.ModuleList(CrossAttentionBlock(width, heads) for _ in range(max(depth, 1)))
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, out_features))

    def forward(self, context_locations: Tensor, context_values: Tensor, context_mask: Tensor | None,
                query_locations: Tensor) -> Tensor:
        context, mask = self.encoder(context_locations, context_values, context_mask)
        if query_locations.dim() != 3 or query_locations.shape[0] != context.shape[0] or (
            query_locations.shape[-1] != self.encoder.location_dim
        ):
            raise ValueError(
                f"query_locations must be [B={context.shape[0]}, Q, {self.encoder.location_dim}], "
                f"got {tuple(query_locations.shape)}"
            )
        q = self.query_embed(query_locations)
        for block in self.blocks:
            q = block(q, context, mask)
        return self.head(q)  # (B, Q, out_features)


__all__ = ["PointSetDecoder", "PointSetEncoder", "PointSetTransformer"]
