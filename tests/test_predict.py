"""`descend predict`: a trained run applied to new rows reproduces what `descend train` measured."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from descend.cli import main
from descend.data.tabular import DEFAULT_FRACTIONS, _split_index

FAST = ["--threads", "1", "--no-progress", "--width", "32", "--batch-size", "32"]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _write_csv(path: Path, header: list[str], rows: np.ndarray | list[list[object]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture(scope="module")
def classification_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """A CSV of 3 Gaussian blobs with string labels and shuffled columns, trained for 150 steps."""
    tmp = tmp_path_factory.mktemp("cls")
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0, 5.0], [3.0, 0.0, 5.0], [0.0, 3.0, 5.0]])
    labels = rng.integers(0, 3, 300)
    X = centres[labels] + rng.normal(scale=1.0, size=(300, 3)) * [1.0, 1.0, 10.0]
    names = np.array(["red", "green", "blue"])[labels]
    _write_csv(tmp / "train.csv", ["a", "kind", "b", "c"], [[x[0], n, x[1], x[2]] for x, n in zip(X, names)])
    run = tmp / "run"
    code = main(["train", "--data", str(tmp / "train.csv"), "--target", "kind", "--steps", "150", *FAST,
                 "--out", str(run)])  # fmt: skip
    assert code == 0
    return tmp, run, X, names


def test_predict_reproduces_the_test_accuracy(classification_run, capsys) -> None:
    tmp, run, X, names = classification_run
    _, _, test = _split_index(len(X), DEFAULT_FRACTIONS, 0)  # the split descend train used (seed 0)
    # the columns in another order, without the label: matched by name
    _write_csv(tmp / "new.csv", ["c", "b", "a"], X[test][:, [2, 1, 0]])
    assert main(["predict", str(run), "--data", str(tmp / "new.csv"), "--out", str(tmp / "p.csv")]) == 0
    rows = _rows(tmp / "p.csv")
    assert len(rows) == len(test) and set(rows[0]) == {"row", "prediction", "p_blue", "p_green", "p_red"}
    accuracy = np.mean([r["prediction"] == n for r, n in zip(rows, names[test])])
    summary = json.loads((run / "summary.json").read_text())
    assert accuracy == pytest.approx(summary["test"]["accuracy"], abs=1e-9)
    for r in rows:  # probabilities sum to 1 and the prediction is their argmax
        p = {k[2:]: float(v) for k, v in r.items() if k.startswith("p_")}
        assert sum(p.values()) == pytest.approx(1.0, abs=1e-4) and max(p, key=p.get) == r["prediction"]
    assert "wrote" in capsys.readouterr().out


def test_wrong_columns_or_shapes_are_one_line_exit_2(classification_run, capsys, tmp_path) -> None:
    _, run, X, _ = classification_run
    _write_csv(tmp_path / "missing.csv", ["a", "b"], X[:5, :2])
    np.savez(tmp_path / "wide.npz", X=np.zeros((4, 5)))
    _write_csv(tmp_path / "text.csv", ["a", "b", "c"], [[1, "x", 2]])
    cases = [
        (["--data", str(tmp_path / "missing.csv")], "missing column(s) 'c'"),
        (["--data", str(tmp_path / "wide.npz")], "X must be numeric of shape [rows, 3]"),
        (["--data", str(tmp_path / "text.csv")], "column 'b' holds 'x'"),
        (["--data", str(tmp_path / "none.csv")], "no such file"),
    ]
    for args, expected in cases:
        assert main(["predict", str(run), *args, "--out", str(tmp_path / "p.csv")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (args, err)
    assert main(["predict", str(tmp_path), "--data", str(tmp_path / "wide.npz")]) == 2
    assert "no preprocessing.json" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()


def test_regression_predictions_are_in_the_target_units(tmp_path) -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 2)) * [1.0, 100.0] + [0.0, 50.0]
    y = 1000.0 + 300.0 * X[:, 0] - 2.0 * X[:, 1]  # linear: a linear model fits it exactly
    _write_csv(tmp_path / "r.csv", ["x0", "x1", "price"], np.column_stack([X, y]))
    run = tmp_path / "run"
    args = ["train", "--data", str(tmp_path / "r.csv"), "--target", "price", "--model", "linear",
            "--optimizer", "gd", "--lr", "0.5", "--steps", "200", "--no-progress", "--out", str(run)]  # fmt: skip
    assert main(args) == 0
    _, _, test = _split_index(len(X), DEFAULT_FRACTIONS, 0)
    _write_csv(tmp_path / "new.csv", ["x0", "x1"], X[test])
    assert main(["predict", str(run), "--data", str(tmp_path / "new.csv"), "--out", str(tmp_path / "p.csv")]) == 0
    predicted = np.array([float(r["price"]) for r in _rows(tmp_path / "p.csv")])
    np.testing.assert_allclose(predicted, y[test], rtol=1e-3, atol=0.5)
    # the summary's test loss is the MSE of standardised targets: the same errors divided by std²
    record = json.loads((run / "preprocessing.json").read_text())
    mse_standardised = np.mean((predicted - y[test]) ** 2) / record["target_std"][0] ** 2
    summary = json.loads((run / "summary.json").read_text())
    assert mse_standardised == pytest.approx(summary["test"]["loss"], rel=1e-2, abs=1e-6)
