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


def test_missing_values_are_handled_at_predict_time_as_in_training(tmp_path, capsys) -> None:
    rng = np.random.default_rng(2)
    X = rng.normal(size=(120, 2)) + np.array([0.0, 10.0])
    y = (X[:, 0] + X[:, 1] > 10).astype(int)
    rows: list[list[object]] = [[a, b, t] for (a, b), t in zip(X.tolist(), y.tolist())]
    rows[5][0] = ""  # one gap in the training data
    _write_csv(tmp_path / "t.csv", ["a", "b", "y"], rows)
    new = [[0.5, ""], [0.1, 10.2], ["NA", 9.0]]  # rows 0 and 2 have a gap
    _write_csv(tmp_path / "new.csv", ["a", "b"], new)
    base = ["train", "--data", str(tmp_path / "t.csv"), "--target", "y", *FAST, "--steps", "20"]
    assert main([*base, "--out", str(tmp_path / "e")]) == 2  # the default refuses it, saying what it is
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "column 'a' has a missing value at line 7 (an empty cell)" in err[0], err

    assert main([*base, "--missing", "mean", "--out", str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["missing"] == "mean"
    fill = json.loads((tmp_path / "m" / "preprocessing.json").read_text())["feature_fill"]
    def predict(run: str, data: str, out: str) -> int:
        return main(["predict", str(tmp_path / run), "--data", str(tmp_path / data), "--out", str(tmp_path / out)])

    assert predict("m", "new.csv", "p.csv") == 0
    filled = [[0.5, fill[1]], [0.1, 10.2], [fill[0], 9.0]]  # the oracle: the gaps filled by hand
    _write_csv(tmp_path / "filled.csv", ["a", "b"], filled)
    assert predict("m", "filled.csv", "q.csv") == 0
    assert _rows(tmp_path / "p.csv") == _rows(tmp_path / "q.csv")

    assert main([*base, "--missing", "drop", "--out", str(tmp_path / "d")]) == 0
    assert "dropped 1 rows with a missing value" in capsys.readouterr().out
    assert predict("d", "new.csv", "r.csv") == 0
    assert [r["row"] for r in _rows(tmp_path / "r.csv")] == ["1"]  # the rows with a gap are left out
    assert "left out 2 rows with a missing value" in capsys.readouterr().out

    rows[5][0] = 0.0  # a run trained on data without gaps, with the default --missing error, refuses them
    _write_csv(tmp_path / "clean.csv", ["a", "b", "y"], rows)
    assert main(["train", "--data", str(tmp_path / "clean.csv"), "--target", "y", *FAST, "--steps", "2",
                 "--out", str(tmp_path / "c")]) == 0  # fmt: skip
    capsys.readouterr()
    assert predict("c", "new.csv", "s.csv") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "column 'b' has a missing value at line 2" in err[0], err


def test_an_unwritable_out_is_named_not_its_temporary_file(classification_run, capsys, tmp_path) -> None:
    _, run, X, _ = classification_run
    _write_csv(tmp_path / "new.csv", ["a", "b", "c"], X[:5])
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("")
    cases = [
        (tmp_path / "newdir" / "p.csv", f"the directory {tmp_path / 'newdir'} does not exist"),
        (tmp_path / "adir", f"{tmp_path / 'adir'} is a directory"),
        (tmp_path / "afile" / "p.csv", "not a directory"),
    ]
    for out, expected in cases:
        assert main(["predict", str(run), "--data", str(tmp_path / "new.csv"), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0] and str(out) in err[0] and ".tmp" not in err[0], err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["adir", "afile", "new.csv"]  # no temporary left


def test_atomic_write_errors_name_the_target(tmp_path) -> None:
    from descend._io import atomic_write

    with pytest.raises(FileNotFoundError) as missing:
        atomic_write(tmp_path / "no" / "x.json", "{}")
    assert missing.value.filename == str(tmp_path / "no" / "x.json")
    with pytest.raises(IsADirectoryError) as directory:
        atomic_write(tmp_path, "{}")
    assert directory.value.filename == str(tmp_path)
    with pytest.raises(ValueError):  # an error of the writer itself passes through, leaving no temporary
        atomic_write(tmp_path / "y.json", lambda f: (_ for _ in ()).throw(ValueError("writer failed")))
    assert list(tmp_path.iterdir()) == []
