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
        (["a", "y"], [[1, 0], ["nan", 1], [2, 0], [3, 1]], "y", r"column 'a' has a missing value at line 3 \('nan'\)"),
        (["a", "y"], [[1, 0], ["", 1], [2, 0], [3, 1]], "y", r"missing value at line 3 \(an empty cell\); fill it in"),
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


# ---- bad input the user can fix: encodings, delimiters, duplicate names, values, the task ------------------
ROWS = [[i, i * 0.5, ["x", "y"][i % 2]] for i in range(20)]


def test_utf8_with_or_without_a_byte_order_mark_reads_the_same(tmp_path) -> None:
    text = "\n".join(["label,a,b"] + [f"{r[2]},{r[0]},{r[1]}" for r in ROWS]) + "\n"
    (tmp_path / "plain.csv").write_bytes(text.encode())
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    plain, bom = load_csv(tmp_path / "plain.csv", "label"), load_csv(tmp_path / "bom.csv", "label")
    assert bom.info["feature_names"] == ["a", "b"] and bom.info["classes"] == ["x", "y"]
    assert torch.equal(plain.train.inputs[0], bom.train.inputs[0])
    assert load_csv(tmp_path / "bom.csv", "label", encoding="utf-8").info["encoding"] == "utf-8"


def test_undecodable_bytes_name_the_offset_and_the_encoding_option(tmp_path) -> None:
    raw = b"a,label\n" + b"".join(f"{i},caf".encode() + (b"\xe9" if i == 3 else b"e") + b"\n" for i in range(9))
    (tmp_path / "latin.csv").write_bytes(raw)
    with pytest.raises(DataError) as e:
        load_csv(tmp_path / "latin.csv", "label")
    message, offset = str(e.value), raw.index(bytes([0xE9]))
    assert f"byte {offset} (line 5" in message and "--encoding" in message and "\n" not in message
    bundle = load_csv(tmp_path / "latin.csv", "label", encoding="latin-1")
    assert bundle.info["classes"] == ["cafe", "caf\u00e9"]
    with pytest.raises(DataError, match="unknown encoding 'klingon'"):
        load_csv(tmp_path / "latin.csv", "label", encoding="klingon")


@pytest.mark.parametrize("delimiter", [",", ";", "\t"])
def test_the_delimiter_is_sniffed_or_given(tmp_path, delimiter) -> None:
    path = tmp_path / "d.csv"
    path.write_text("\n".join(delimiter.join(map(str, r)) for r in [["a", "b", "label"], *ROWS]) + "\n")
    reference = load_csv(tmp_path / "d.csv", "label", delimiter=delimiter)
    sniffed = load_csv(path, "label")
    assert sniffed.info["delimiter"] == delimiter and sniffed.in_features == 2
    assert torch.equal(sniffed.train.inputs[0], reference.train.inputs[0])


def test_semicolons_with_decimal_commas_are_not_mistaken_for_commas(tmp_path) -> None:
    path = tmp_path / "eu.csv"
    path.write_text("a;b;label\n" + "".join(f"{i};{i},5;{i % 2}\n" for i in range(20)))
    with pytest.raises(DataError, match=r"column 'b' is not numeric \(line 2: '0,5'\)"):
        load_csv(path, "label")
    with pytest.raises(DataError, match="one character"):
        load_csv(path, "label", delimiter=";;")
    path.write_text("a|label\n" + "".join(f"{i}|{i % 2}\n" for i in range(20)))
    with pytest.raises(DataError, match="--delimiter"):
        load_csv(path, "label")
    assert load_csv(path, "label", delimiter="|").in_features == 1


def test_duplicate_or_empty_column_names_are_errors(tmp_path) -> None:
    path = tmp_path / "d.csv"
    _write_csv(path, ["a", "b", "a", "b", "y"], [[1, 2, 3, 4, i % 2] for i in range(10)])
    with pytest.raises(DataError, match="column name\\(s\\) 'a', 'b' appear more than once"):
        load_csv(path, "y")
    _write_csv(path, ["a", "", "y"], [[1, 2, i % 2] for i in range(10)])
    with pytest.raises(DataError, match="column 2 of the header has no name"):
        load_csv(path, "y")


def test_a_blank_line_does_not_shift_the_line_named_in_an_error(tmp_path) -> None:
    (tmp_path / "d.csv").write_text("a,y\n1,0\n\n2,1\nnan,0\n3,1\n")
    with pytest.raises(DataError, match=r"missing value at line 5 \('nan'\)"):
        load_csv(tmp_path / "d.csv", "y")


@pytest.mark.parametrize(
    ("value", "accepted"),
    [("1e308", False), ("-1e39", False), ("inf", False), ("-Infinity", False), ("3e38", True)],
)
def test_feature_values_must_fit_float32(tmp_path, value, accepted) -> None:
    rows = [[i, i % 2] for i in range(10)]
    rows[4][0] = value
    _write_csv(tmp_path / "d.csv", ["a", "y"], rows)
    if accepted:
        bundle = load_csv(tmp_path / "d.csv", "y")
        assert all(bool(torch.isfinite(s.inputs[0]).all()) for s in (bundle.train, bundle.val, bundle.test))
        return
    with pytest.raises(DataError, match=f"column 'a' holds '{value}' at line 6"):
        load_csv(tmp_path / "d.csv", "y")


def test_huge_values_would_overflow_standardisation_so_they_are_refused() -> None:
    X = np.zeros((10, 2))
    X[3, 1] = 1e308
    with np.errstate(over="ignore"):  # the oracle: float64 statistics of such a column overflow
        assert not np.isfinite(np.std(np.concatenate([X[:, 1], [1e308]])))
    with pytest.raises(DataError, match=r"feature column 'b' at row 3 \(counting from 0\) is 1e\+308, beyond float32"):
        from_arrays(X, np.arange(10) % 2, name="t", feature_names=["a", "b"])
    with pytest.raises(DataError, match=r"target column 0 at row 2 .* is inf"):
        from_arrays(np.ones((10, 1)), np.array([0.5, 1.5, np.inf] + [0.25] * 7), name="t")
    with pytest.raises(DataError, match="the target is nan at row 1"):
        from_arrays(np.ones((5, 1)), np.array([0.0, np.nan, 1.0, 0.0, 1.0]), name="t", task="classification")


def test_npz_values_are_checked_like_csv_values(tmp_path) -> None:
    X = np.random.default_rng(0).normal(size=(20, 3))
    X[7, 2] = -np.inf
    np.savez(tmp_path / "d.npz", X=X, y=np.arange(20) % 2)
    with pytest.raises(DataError, match=r"d: feature column 2 at row 7 .* is -inf, infinite"):
        load_data(str(tmp_path / "d.npz"))
    y = np.random.default_rng(1).normal(size=20)
    y[5] = 4e38
    np.savez(tmp_path / "e.npz", X=np.ones((20, 1)), y=y)
    with pytest.raises(DataError, match=r"target column 0 at row 5 .* beyond float32"):
        load_data(str(tmp_path / "e.npz"))


def test_a_thousand_integer_classes_are_classification(tmp_path) -> None:
    y = np.repeat(np.arange(1000), 5)
    X = np.random.default_rng(0).normal(size=(len(y), 2))
    np.savez(tmp_path / "many.npz", X=X, y=y)
    bundle = load_data(str(tmp_path / "many.npz"))
    assert (bundle.task, bundle.out_features, bundle.info["task_source"]) == ("classification", 1000, "inferred")
    assert "1000 distinct integer values over 5000 rows" in bundle.info["task_reason"]
    np.savez(tmp_path / "thin.npz", X=X[:4999], y=y[:4999])  # one row short of 5 per class
    assert load_data(str(tmp_path / "thin.npz")).task == "regression"


def test_a_small_integer_regression_target_is_not_taken_for_classes(tmp_path) -> None:
    from sklearn.datasets import load_linnerud

    d = load_linnerud()  # 20 rows; body weight in whole pounds, 17 distinct values
    header = [*d.feature_names, "Weight"]
    _write_csv(tmp_path / "linnerud.csv", header, [[*map(int, x), int(t[0])] for x, t in zip(d.data, d.target)])
    bundle = load_csv(tmp_path / "linnerud.csv", "Weight")
    assert (bundle.task, bundle.info["task_source"]) == ("regression", "inferred")
    assert "over 20 rows (fewer than 5 per class)" in bundle.info["task_reason"]
    forced = load_csv(tmp_path / "linnerud.csv", "Weight", task="classification")
    assert (forced.task, forced.info["task_source"]) == ("classification", "given")
    assert forced.out_features == len(np.unique(d.target[:, 0]))
    _write_csv(tmp_path / "b.csv", ["a", "y"], [[i, i % 2] for i in range(6)])  # two values: classes at any size
    assert load_csv(tmp_path / "b.csv", "y").task == "classification"


# ---- missing values: an error that says so, or dropped, or filled with the training means --------------------
def _with_gaps(path):
    """40 rows, ``a = i``, ``b = 2i``; ``a`` is missing at rows 3 and 17 (empty, NA), ``b`` at row 8 (NaN)."""
    rows = [[i, 2 * i, i % 2] for i in range(40)]
    rows[3][0], rows[17][0], rows[8][1] = "", "NA", "NaN"
    _write_csv(path, ["a", "b", "y"], rows)
    return rows


def test_a_missing_value_is_named_as_one_with_its_line_column_and_the_options(tmp_path) -> None:
    _with_gaps(tmp_path / "g.csv")
    with pytest.raises(DataError) as error:
        load_csv(tmp_path / "g.csv", "y")
    message = str(error.value)
    assert "column 'a' has a missing value at line 5 (an empty cell)" in message
    assert "--missing drop" in message and "--missing mean" in message and "not numeric" not in message


def test_missing_drop_removes_exactly_the_rows_with_a_gap(tmp_path) -> None:
    _with_gaps(tmp_path / "g.csv")
    bundle = load_data(str(tmp_path / "g.csv"), target="y", missing="drop")
    assert bundle.info["rows_dropped"] == 3 and bundle.info["rows"] == 37
    mean, std = np.array(bundle.info["feature_mean"]), np.array(bundle.info["feature_std"])
    splits = (bundle.train, bundle.val, bundle.test)
    a = np.concatenate([(s.inputs[0].double().numpy() * std + mean)[:, 0] for s in splits])
    assert sorted(np.round(a).astype(int).tolist()) == [i for i in range(40) if i not in (3, 8, 17)]


def test_missing_mean_fills_the_training_rows_column_means(tmp_path) -> None:
    _with_gaps(tmp_path / "g.csv")
    bundle = load_data(str(tmp_path / "g.csv"), target="y", missing="mean", seed=1)
    from descend.data.tabular import DEFAULT_FRACTIONS, _split_index

    train, _, _ = _split_index(40, DEFAULT_FRACTIONS, 1)  # the oracle: the training rows' own values
    a = [i for i in train if i not in (3, 17)]
    b = [2 * i for i in train if i != 8]
    assert bundle.info["feature_fill"] == pytest.approx([np.mean(a), np.mean(b)])
    assert bundle.info["rows_filled"] == 3 and bundle.info["rows"] == 40
    mean, std = np.array(bundle.info["feature_mean"]), np.array(bundle.info["feature_std"])
    inputs = np.concatenate([s.inputs[0].double().numpy() for s in (bundle.train, bundle.val, bundle.test)])
    assert np.isfinite(inputs).all()
    raw = inputs * std + mean
    assert np.isclose(raw[:, 0], np.mean(a), atol=1e-4).sum() >= 2  # rows 3 and 17 hold the fill


def test_missing_values_in_an_npz_follow_the_same_option(tmp_path) -> None:
    X = np.random.default_rng(0).normal(size=(30, 2))
    X[4, 1] = np.nan
    np.savez(tmp_path / "d.npz", X=X, y=np.arange(30) % 2)
    with pytest.raises(DataError, match=r"feature column 1 at row 4 .* is missing .*--missing drop"):
        load_data(str(tmp_path / "d.npz"))
    assert load_data(str(tmp_path / "d.npz"), missing="drop").info["rows_dropped"] == 1
    assert load_data(str(tmp_path / "d.npz"), missing="mean").info["rows_filled"] == 1


# The splits every result so far was computed on: (sizes, seed) -> (train, val, test) indices, as the
# loaders cut them before they shared one helper. A change here changes every reported number.
TABLE_SPLITS = [
    ((10, (0.7, 0.1), 0), ([4, 1, 7, 5, 3, 9, 0], [8], [6, 2])),
    ((12, (0.7, 0.1), 1), ([1, 4, 6, 8, 11, 0, 5, 3], [2], [9, 10, 7])),
    ((23, (0.5, 0.25), 7), ([10, 15, 1, 9, 11, 20, 7, 14, 21, 12, 5, 18], [17, 0, 16, 3, 6, 8], [2, 4, 13, 19, 22])),
]
POINT_SPLITS = [
    ((12, 0.25, 0.25, 1), ([5, 3, 2, 9, 10, 7], [1, 4, 6], [8, 11, 0])),
    ((10, 0.1, 0.1, 0), ([7, 5, 3, 9, 0, 8, 6, 2], [4], [1])),
    ((7, 0.2, 0.0, 5), ([0, 4, 2, 6, 5, 3], [1], [])),
]


@pytest.mark.parametrize(("args", "expected"), TABLE_SPLITS)
def test_table_splits_are_unchanged_for_a_seed(args, expected) -> None:
    from descend.data.tabular import _split_index

    assert [part.tolist() for part in _split_index(*args)] == [list(e) for e in expected]


@pytest.mark.parametrize(("args", "expected"), POINT_SPLITS)
def test_point_set_splits_are_unchanged_for_a_seed(args, expected) -> None:
    from descend.data.points import split_indices

    assert [part.tolist() for part in split_indices(*args)] == [list(e) for e in expected]


@pytest.mark.parametrize("n", [3, 10, 97, 1000])
def test_splits_partition_a_seeded_permutation(n: int) -> None:
    from descend.data._base import seeded_split

    first, second, rest = seeded_split(n, (0.3, 0.2), seed=n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    assert torch.equal(torch.cat([first, second, rest]), order)
    assert (len(first), len(second)) == (max(round(0.3 * n), 1), max(round(0.2 * n), 1))
    with pytest.raises(ValueError, match="leave nothing"):
        seeded_split(2, (0.5, 0.5), seed=0)
