"""Point-set generators: ``make_shapes`` layout, centring, principal frame, normalisation and seeding."""

from __future__ import annotations

import pytest
import torch

from descend.data import make_shapes
from descend.data.points import SHAPES


def _real(bundle_split, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    locations, values, mask = bundle_split.inputs
    return locations[i][mask[i]].double(), values[i][mask[i]].double()


def test_shapes_layout_labels_and_padding() -> None:
    bundle = make_shapes(n_per_class=4, points=(10, 20), seed=0, val_fraction=0.25, test_fraction=0.25)
    assert (bundle.task, bundle.out_features, bundle.location_dim, bundle.value_dim) == ("classification", 5, 3, 1)
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 4 * len(SHAPES)
    labels = torch.cat([bundle.train.targets, bundle.val.targets, bundle.test.targets])
    assert torch.bincount(labels, minlength=5).tolist() == [4] * 5
    locations, values, mask = bundle.train.inputs
    counts = mask.sum(1)
    assert bool(((counts >= 10) & (counts <= 20)).all())
    assert bool((locations[~mask] == 0).all()) and bool((values[~mask] == 0).all())


@pytest.mark.parametrize("pose", ["random", "principal"])
@pytest.mark.parametrize("normalise", [False, True])
def test_shapes_centred_value_is_distance_and_normalised(pose: str, normalise: bool) -> None:
    bundle = make_shapes(n_per_class=3, points=(30, 40), seed=1, pose=pose, normalise=normalise)
    for i in range(len(bundle.train)):
        p, v = _real(bundle.train, i)
        assert torch.allclose(p.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-5)
        assert torch.allclose(v[:, 0], p.norm(dim=1), atol=1e-5)
        rms = p.pow(2).sum(1).mean().sqrt()
        if normalise:
            assert abs(float(rms) - 1.0) < 1e-5
        if pose == "principal":
            var = p.pow(2).mean(0)
            assert bool(var[0] >= var[1] - 1e-6) and bool(var[1] >= var[2] - 1e-6)
            assert bool((p.pow(3).sum(0) >= -1e-5).all())


def test_shapes_seeded_and_checked() -> None:
    a, b = make_shapes(n_per_class=2, seed=3), make_shapes(n_per_class=2, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.train.inputs, b.train.inputs))
    assert not torch.equal(a.train.inputs[0], make_shapes(n_per_class=2, seed=4).train.inputs[0])
    with pytest.raises(ValueError, match="pose"):
        make_shapes(n_per_class=1, pose="upright")
    with pytest.raises(ValueError, match="points"):
        make_shapes(n_per_class=1, points=(5, 2))
