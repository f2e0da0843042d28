"""descend.nn: the networks.

- :class:`Linear`: linear / logistic / softmax regression (``torch.nn.Linear`` with a choice of init).
- :class:`MLP`: plain MLP with a choice of depth, activation, init and normalisation.
- :class:`ResidualMLP`: pre-norm residual MLP ``z + s f(norm(z))``; ``residual=False`` is the plain
  network with the same parameters.
- :class:`PointSetTransformer` and :class:`PointSetDecoder`: attention over point sets
  (``locations [B, N, d_loc]``, ``values [B, N, d_val]``, ``mask [B, N]``), with full or induced-point
  self-attention, pooling by attention and a cross-attention decoder.
- :class:`TransformerLM`: a small causal (GPT-style) language model, ``idx [B, T] -> logits [B, T, vocab]``,
  pre-norm blocks on ``scaled_dot_product_attention(is_causal=True)``, tied embeddings;
  :meth:`TransformerLM.generate` samples from it (temperature, top-k, top-p) with a :class:`KVCache`.
- :func:`parameter_estimate` and :func:`check_model_size`: the size of a model named by ``--model``,
  known (and refused when it would not fit the machine) before anything is allocated.
"""

from ._attention import (
    AttentionPooling,
    CrossAttentionBlock,
    FeedForward,
    InducedAttentionBlock,
    MultiheadAttention,
    PointEmbedding,
    SelfAttentionBlock,
)
from ._mlp import (
    ACTIVATIONS,
    INITS,
    MLP,
    NORMS,
    Linear,
    MLPBlock,
    ResidualBlock,
    ResidualMLP,
    count_parameters,
    init_linear,
)
from ._pointset import PointSetDecoder, PointSetEncoder, PointSetTransformer
from ._size import MAX_PARAMETERS, check_model_size, parameter_estimate, physical_memory
from ._transformer import CausalSelfAttention, KVCache, TransformerBlock, TransformerLM, sample_next

__all__ = [
    "ACTIVATIONS",
    "INITS",
    "MAX_PARAMETERS",
    "MLP",
    "NORMS",
    "AttentionPooling",
    "CausalSelfAttention",
    "CrossAttentionBlock",
    "FeedForward",
    "InducedAttentionBlock",
    "KVCache",
    "Linear",
    "MLPBlock",
    "MultiheadAttention",
    "PointEmbedding",
    "PointSetDecoder",
    "PointSetEncoder",
    "PointSetTransformer",
    "ResidualBlock",
    "ResidualMLP",
    "SelfAttentionBlock",
    "TransformerBlock",
    "TransformerLM",
    "check_model_size",
    "count_parameters",
    "init_linear",
    "parameter_estimate",
    "physical_memory",
    "sample_next",
]
