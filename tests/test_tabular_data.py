"""Tabular loading: task inference, train-only standardisation, seeded splits, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from descend.data.registry import load_data
from descend.data.tabular import DataError, from_arrays, load_csv, load_digits


def _write_csv(path, header, rows) -> None:
    path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n")


def test_digits_split_sizes_and_train_only_standardisation() -> None:
    from sklearn.datasets import load_digits as sk

    bundle = load_digits(seed=0)
    assert (bundle.task, bundle.out_features, bundle.in_features) == ("classification", 10, 64)
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 1797
    x = bundle.train.inputs[0].double()
    assert torch.allclose(x.mean(0), torch.zeros(64, dtype=torch.float64), atol=1e-5)
    constant = sk().data[:, :].std(0) == 0
    stds = x.std(0, unbiased=False)
    nonconstant_in_train = stds > 1e-3
    assert torch.allclose(stds[nonconstant_in_train], torch.ones_like(stds[nonconstant_in_train]), atol=1e-4)
    assert bool((stds[torch.as_tensor(constant)] == 0).all())  # constant pixels stay 0, not NaN
    # the validation rows are transformed with the *training* statistics, so they are not exactly standard
    assert not torch.allclose(bundle.val.inputs[0].mean(0), torch.zeros(64), atol=1e-6)


def test_split_is_seeded() -> None:
    a, b, c = load_digits(seed=1), load_digits(seed=1), load_digits(seed=2)
    assert torch.equal(a.test.targets, b.test.targets)
    assert not torch.equal(a.test.inputs[0], c.test.inputs[0])


def test_standardisation_matches_a_hand_computation() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(3.0, 5.0, size=(50, 2))
    y = rng.normal(size=50)
    bundle = from_arrays(X, y, name="t", seed=0)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(0)).numpy()
    train = X[perm[:35]]
    expected = (X[perm[35:40]] - train.mean(0)) / train.std(0)
    np.testing.assert_allclose(bundle.val.inputs[0].numpy(), expected, rtol=1e-5)
    assert bundle.task == "regression" and bundle.train.targets.shape == (35, 1)


def test_csv_task_inference_and_override(tmp_path) -> None:
    path = tmp_path / "d.csv"
    _write_csv(path, ["a", "b", "label"], [[i, i * 0.5, ["x", "y"][i % 2]] for i in range(20)])
    bundle = load_data(str(path), target="label")
    assert bundle.task == "classification" and bundle.info["classes"] == ["x", "y"]
    _write_csv(path, ["a", "y"], [[i, i % 3] for i in range(20)])
    assert load_csv(path, "y").task == "classification"
    assert load_csv(path, "y", task="regression").task == "regression"
    _write_csv(path, ["a", "y"], [[i, i * 0.37] for i in range(30)])
    assert load_csv(path, "y").task == "regression"


@pytest.mark.parametrize(
    ("header", "rows", "target", "match"),
    [
        (["a", "y"], [[1, 0]] * 5, "z", "no column 'z'"),
        (["a", "y"], [["cat", 0]] * 5, "y", "column 'a' is not numeric"),
        (["a", "y"], [[1, 0], ["nan", 1], [2, 0], [3, 1]], "y", "holds 'nan'"),
        (["a", "y"], [[1, 0], ["inf", 1], [2, 0], [3, 1]], "y", "holds 'inf'"),
        (["a", "y"], [], "y", "no data rows"),
    ],
)
def test_csv_errors(tmp_path, header, rows, target, match) -> None:
    path = tmp_path / "bad.csv"
    _write_csv(path, header, rows)
    with pytest.raises(DataError, match=match):
        load_csv(path, target)


def test_npz_and_missing_files(tmp_path) -> None:
    np.savez(tmp_path / "d.npz", X=np.random.default_rng(0).normal(size=(30, 3)), y=np.arange(30) % 2)
    bundle = load_data(str(tmp_path / "d.npz"))
    assert bundle.task == "classification" and bundle.in_features == 3
    np.savez(tmp_path / "e.npz", features=np.zeros((3, 3)))
    with pytest.raises(DataError, match="lacks X and y"):
        load_data(str(tmp_path / "e.npz"))
    with pytest.raises(DataError, match="does not exist"):
        load_data(str(tmp_path / "missing.csv"), target="y")
    with pytest.raises(DataError, match="unknown dataset"):
        load_data("mnist")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_data(str(tmp_path / "empty.csv"), target="y")
