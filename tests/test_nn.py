"""Networks: shapes, argument checking, initialisation statistics, and the set symmetries of attention."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from descend.nn import (
    MLP,
    InducedAttentionBlock,
    Linear,
    MultiheadAttention,
    PointSetDecoder,
    PointSetTransformer,
    ResidualMLP,
    count_parameters,
    parameter_estimate,
)

INDUCING = [None, 4]
TOL = 1e-5


def _sets(B: int = 3, N: int = 12, d_loc: int = 2, d_val: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, d_loc, generator=g), torch.randn(B, N, d_val, generator=g)


# --- Linear, MLP, ResidualMLP -------------------------------------------------------------------


def test_linear_is_affine_map_and_fits_least_squares() -> None:
    torch.manual_seed(0)
    layer = Linear(3, 2)
    x = torch.randn(5, 3)
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)
    # linear regression: the least-squares optimum has zero gradient
    X, W = torch.randn(64, 3), torch.randn(3, 2)
    Y = X @ W + 0.5
    sol = torch.linalg.lstsq(torch.cat([X, torch.ones(64, 1)], 1), Y).solution
    with torch.no_grad():
        layer.weight.copy_(sol[:3].T)
        layer.bias.copy_(sol[3])
    F.mse_loss(layer(X), Y).backward()
    assert layer.weight.grad.abs().max() < 1e-5


def test_mlp_structure_and_shapes() -> None:
    model = MLP(5, 3, width=7, depth=4, activation="tanh", norm="layer")
    assert model(torch.randn(2, 5)).shape == (2, 3)
    assert len(model.blocks) == 4
    # (5*7+7) + 3*(7*7+7) + (7*3+3) + 4 layer norms of 2*7
    assert count_parameters(model) == 42 + 3 * 56 + 24 + 4 * 14
    assert MLP(5, 3, depth=0)(torch.randn(2, 5)).shape == (2, 3)
    bn = MLP(5, 3, norm="batch")
    assert isinstance(bn.blocks[0].norm, torch.nn.BatchNorm1d)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"activation": "swish"}, "activation"),
        ({"init": "orthogonal"}, "init"),
        ({"init": -1.0}, "init"),
        ({"norm": "group"}, "norm"),
        ({"depth": -1}, "depth"),
        ({"width": 0}, "width"),
    ],
)
def test_mlp_rejects_bad_arguments_naming_them(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        MLP(4, 2, **kwargs)


def test_mlp_error_lists_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"relu.*sigmoid.*tanh.*gelu"):
        MLP(4, 2, activation="swish")
    with pytest.raises(ValueError, match="branch_scale"):
        ResidualMLP(4, 2, branch_scale=0.0)


@pytest.mark.parametrize(
    ("init", "expected_std"),
    [
        ("default", 1 / math.sqrt(3 * 256)),  # U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        ("he", math.sqrt(2 / 256)),
        ("xavier", math.sqrt(2 / (256 + 256))),  # ReLU gain sqrt(2) -> 2 * 2/(in+out)
        (3.0, 3.0 / math.sqrt(256)),
    ],
)
def test_init_weight_std_matches_closed_form(init: str | float, expected_std: float) -> None:
    torch.manual_seed(0)
    model = MLP(256, 4, width=256, depth=2, init=init)
    w = model.blocks[1].linear.weight  # 65,536 draws: std within ~1 %
    expected = expected_std * (math.sqrt(2) if init == "xavier" else 1.0)
    assert abs(float(w.detach().std()) / expected - 1) < 0.03
    if init != "default":
        assert float(model.blocks[1].linear.bias.detach().abs().max()) == 0.0


def test_residual_mlp_equal_size_and_formula() -> None:
    res = ResidualMLP(6, 2, width=8, depth=5, residual=True)
    plain = ResidualMLP(6, 2, width=8, depth=5, residual=False)
    assert count_parameters(res) == count_parameters(plain)
    # one block by hand: z + s * (W act(LN(z)) + b)
    torch.manual_seed(1)
    model = ResidualMLP(3, 2, width=4, depth=1, activation="tanh", branch_scale=0.5)
    block = model.blocks[0]
    z = torch.randn(5, 4)
    ln = (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + 1e-5)
    expected = z + 0.5 * (torch.tanh(ln) @ block.linear.weight.T + block.linear.bias)
    torch.testing.assert_close(block(z), expected, atol=1e-5, rtol=1e-5)
    block.residual = False
    torch.testing.assert_close(block(z), torch.tanh(ln) @ block.linear.weight.T + block.linear.bias,
                               atol=1e-5, rtol=1e-5)


# --- attention over point sets -------------------------------------------------------------------


def test_multihead_attention_matches_hand_computation() -> None:
    torch.manual_seed(0)
    attn = MultiheadAttention(width=8, heads=2)
    q_in, k_in = torch.randn(1, 3, 8), torch.randn(1, 5, 8)
    mask = torch.tensor([[True, True, False, True, False]])
    out = attn(q_in, k_in, mask)
    q = attn.q(q_in)
    k, v = attn.kv(k_in).split(8, dim=-1)
    heads = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        scores = q[0, :, sl] @ k[0, :, sl].T / 2.0
        scores = scores.masked_fill(~mask[0], float("-inf"))
        heads.append(scores.softmax(-1) @ v[0, :, sl])
    expected = attn.out(torch.cat(heads, -1))[None]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("inducing", INDUCING)
def test_set_transformer_is_permutation_invariant_and_equivariant(inducing: int | None) -> None:
    torch.manual_seed(0)
    model = PointSetTransformer(2, 1, 5, width=32, depth=2, heads=4, inducing_points=inducing).eval()
    loc, val = _sets()
    perm = torch.randperm(loc.shape[1])
    with torch.no_grad():
        out, out_p = model(loc, val), model(loc[:, perm], val[:, perm])
        enc, enc_p = model.encode(loc, val), model.encode(loc[:, perm], val[:, perm])
    assert (out - out_p).abs().max() <= TOL
    assert (enc[:, perm] - enc_p).abs().max() <= TOL
    assert out.shape == (3, 5) and enc.shape == (3, 12, 32)
    assert (enc - enc.roll(1, dims=1)).abs().max() > 1e-2  # per-point outputs differ: the test can fail


@pytest.mark.parametrize("inducing", INDUCING)
def test_set_transformer_ignores_padding_and_batches_ragged_sets(inducing: int | None) -> None:
    torch.manual_seed(0)
    model = PointSetTransformer(2, 1, 5, width=32, depth=2, heads=4, inducing_points=inducing).eval()
    sizes = [3, 9, 6]
    alone = [_sets(1, n, seed=i) for i, n in enumerate(sizes)]
    N = max(sizes)
    loc, val = torch.full((3, N, 2), 7.0), torch.full((3, N, 1), -5.0)  # junk padding
    mask = torch.zeros(3, N, dtype=torch.bool)
    for i, (l, v) in enumerate(alone):
        loc[i, : sizes[i]], val[i, : sizes[i]], mask[i, : sizes[i]] = l[0], v[0], True
    with torch.no_grad():
        batched = model(loc, val, mask)
        other_junk = model(torch.where(mask[..., None], loc, -3.0), torch.where(mask[..., None], val, 11.0), mask)
        singles = torch.cat([model(l, v) for l, v in alone])
        enc = model.encode(loc, val, mask)
        enc_alone = model.encode(*alone[0])
    assert (batched - singles).abs().max() <= TOL
    assert (batched - other_junk).abs().max() <= TOL
    assert (enc[0, :3] - enc_alone[0]).abs().max() <= TOL
    assert enc[~mask].abs().max() == 0.0
    # without the mask the junk does matter, so the comparison above is not vacuous
    with torch.no_grad():
        assert (model(loc, val) - singles).abs().max() > 1e-3


@pytest.mark.parametrize("inducing", INDUCING)
def test_all_masked_set_is_finite_and_independent_of_padding(inducing: int | None) -> None:
    torch.manual_seed(0)
    model = PointSetTransformer(2, 1, 5, width=16, depth=1, heads=2, inducing_points=inducing).eval()
    with torch.no_grad():
        a = model(*_sets(1, 4, seed=1), torch.zeros(1, 4, dtype=torch.bool))
        b = model(torch.full((1, 9, 2), float("nan")), torch.full((1, 9, 1), 1e30), torch.zeros(1, 9, dtype=torch.bool))
    assert torch.isfinite(a).all()
    assert (a - b).abs().max() <= TOL
    # gradients stay finite too, even with non-finite padding
    loc = torch.full((2, 5, 2), float("nan"))
    loc[0, :2] = 0.3
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, :2] = True
    model(loc, torch.zeros(2, 5, 1), mask).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("inducing", INDUCING)
def test_decoder_symmetries(inducing: int | None) -> None:
    torch.manual_seed(0)
    model = PointSetDecoder(1, 1, 2, width=32, depth=2, heads=4, inducing_points=inducing).eval()
    cl, cv = _sets(2, 10, 1, 1)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    ql = torch.randn(2, 7, 1)
    cperm, qperm = torch.randperm(10), torch.randperm(7)
    with torch.no_grad():
        out = model(cl, cv, mask, ql)
        out_c = model(cl[:, cperm], cv[:, cperm], mask[:, cperm], ql)
        out_q = model(cl, cv, mask, ql[:, qperm])
        junk = model(torch.where(mask[..., None], cl, 9.0), torch.where(mask[..., None], cv, -9.0), mask, ql)
        alone = model(cl[1:, :6], cv[1:, :6], None, ql[1:])
        one_query = model(cl, cv, mask, ql[:, :1])
    assert out.shape == (2, 7, 2)
    assert (out - out_c).abs().max() <= TOL
    assert (out[:, qperm] - out_q).abs().max() <= TOL
    assert (out - junk).abs().max() <= TOL
    assert (out[1:] - alone).abs().max() <= TOL
    assert (out[:, :1] - one_query).abs().max() <= TOL
    assert (out[:, 0] - out[:, 1]).abs().max() > 1e-3


def test_induced_attention_never_builds_an_n_by_n_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    """A million points on the meta device (shapes only, no arithmetic, so the test is cheap): every
    attention call is at most ``m x N``, and no tensor autograd saves for the backward pass has more
    than ``O(N width)`` elements, so no ``N x N`` matrix is built anywhere in the graph."""
    seen: list[tuple[int, int]] = []
    saved: list[int] = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.shape[-2], k.shape[-2]))
        return sdpa(q, k, v, *args, **kwargs)

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    N, m, width = 1_000_000, 8, 16
    with torch.device("meta"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model = PointSetTransformer(2, 1, 3, width=width, depth=2, heads=2, inducing_points=m)
        out = model(torch.randn(1, N, 2), torch.randn(1, N, 1))
        out.sum().backward()
    assert out.shape == (1, 3)
    assert seen and max(q * k for q, k in seen) == N * m  # each attention is at most m x N
    # the widest saved tensor is the embedding's input [N, 2 + 2*32 + 1]; an N x N one would be 10^12
    assert max(saved) <= 100 * N
    assert model.encoder.embed.mlp[0].weight.grad is not None
    seen.clear()
    PointSetTransformer(2, 1, 3, width=16, depth=1, heads=2)(*_sets(1, 50))
    assert max(q * k for q, k in seen) == 50 * 50  # full attention does build N x N


def test_point_models_validate_shapes_and_heads() -> None:
    model = PointSetTransformer(2, 1, 3, width=16, heads=4)
    with pytest.raises(ValueError, match="locations"):
        model(torch.randn(2, 5, 3), torch.randn(2, 5, 1))
    with pytest.raises(ValueError, match="values"):
        model(torch.randn(2, 5, 2), torch.randn(2, 4, 1))
    with pytest.raises(ValueError, match="mask"):
        model(torch.randn(2, 5, 2), torch.randn(2, 5, 1), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="heads"):
        PointSetTransformer(2, 1, 3, width=10, heads=4)
    with pytest.raises(ValueError, match="inducing_points"):
        InducedAttentionBlock(8, 2, 0)
    with pytest.raises(ValueError, match="location_embedding"):
        PointSetTransformer(2, 1, 3, location_embedding="sinusoid")
    with pytest.raises(ValueError, match="query_locations"):
        PointSetDecoder(1, 1, 1, width=16)(torch.randn(2, 5, 1), torch.randn(2, 5, 1), None, torch.randn(2, 3, 2))


def test_learned_location_embedding_also_invariant() -> None:
    torch.manual_seed(0)
    model = PointSetTransformer(2, 1, 3, width=16, heads=2, location_embedding="learned").eval()
    loc, val = _sets()
    perm = torch.randperm(12)
    with torch.no_grad():
        assert (model(loc, val) - model(loc[:, perm], val[:, perm])).abs().max() <= TOL


def test_hidden_is_a_deprecated_alias_of_width() -> None:
    with pytest.warns(DeprecationWarning, match="width"):
        old = MLP(4, 2, hidden=9)
    assert next(m.out_features for m in old.modules() if isinstance(m, torch.nn.Linear)) == 9


# --- activation checkpointing ------------------------------------------------------------------------------------


def _saved_bytes(fn) -> tuple[int, torch.Tensor]:
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs (recomputed ones are not saved)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out


@pytest.mark.parametrize("kind", ["resmlp", "transformer"])
def test_checkpointed_blocks_give_the_same_gradients_and_store_less(kind: str) -> None:
    from descend.nn import ResidualMLP, TransformerLM

    def build(checkpoint: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        if kind == "resmlp":
            return ResidualMLP(10, 3, width=32, depth=6, checkpoint=checkpoint)
        return TransformerLM(50, 16, width=32, depth=4, heads=4, checkpoint=checkpoint)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 10, generator=g) if kind == "resmlp" else torch.randint(0, 50, (4, 16), generator=g)
    grads, saved = {}, {}
    for checkpoint in (False, True):
        model = build(checkpoint)
        saved[checkpoint], out = _saved_bytes(lambda m=model: m(x))
        out.square().mean().backward()
        grads[checkpoint] = [p.grad for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(grads[False], grads[True]))
    assert saved[True] < 0.5 * saved[False]


def test_checkpoint_refuses_batch_norm() -> None:
    from descend.nn import ResidualMLP

    with pytest.raises(ValueError, match="batch norm"):
        ResidualMLP(4, 2, norm="batch", checkpoint=True)


@pytest.mark.parametrize(("depth", "width"), [(0, 8), (1, 8), (3, 16), (2, 33)])
def test_parameter_estimate_counts_linear_and_mlp_exactly_and_bounds_resmlp(depth: int, width: int) -> None:
    assert parameter_estimate("linear", depth, width, 5, 3) == count_parameters(Linear(5, 3))
    assert parameter_estimate("mlp", depth, width, 5, 3) == count_parameters(MLP(5, 3, width=width, depth=depth))
    if depth > 0:  # an over-estimate is what a size check before allocation needs
        residual = ResidualMLP(5, 3, width=width, depth=depth)
        assert count_parameters(residual) <= parameter_estimate("resmlp", depth, width, 5, 3)
    with pytest.raises(ValueError, match="unknown model 'cnn'"):
        parameter_estimate("cnn", depth, width, 5, 3)
