"""Each experiment asserts its finding, through the same ``run`` the command line calls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from descend.experiments import EXPERIMENTS, run

NAMES = ["gd-vs-sgd", "momentum-noise", "badly-scaled", "adam-softsign", "weight-decay", "depth", "point-sets"]


def _run(name: str, tmp_path: Path, quick: bool = True) -> dict:
    numbers = run(name, tmp_path, quick=quick, verbose=False)
    png, data = tmp_path / f"{name}.png", tmp_path / f"{name}.json"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(data.read_text())["finding"] == numbers["finding"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"
    return numbers


def test_registry_names_every_experiment() -> None:
    assert list(EXPERIMENTS) == NAMES


def test_unknown_name_lists_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="gd-vs-sgd"):
        run("sgd-vs-gd", tmp_path)


def test_adam_direction_is_close_to_softsign_momentum(tmp_path: Path) -> None:
    cos = _run("adam-softsign", tmp_path)["mean_cosine_second_half"]
    softsign = cos["softsign momentum (eps 1e-4)"]
    assert softsign > 0.8
    assert softsign > cos["momentum (EMA)"] + 0.03
    assert softsign > cos["Signum"]
    assert softsign > cos["SGD (the gradient)"] + 0.4


@pytest.mark.slow
def test_sgd_reaches_gd_loss_touching_fewer_examples(tmp_path: Path) -> None:
    reach = _run("gd-vs-sgd", tmp_path)["reach"]
    fractions = [reach[f"SGD batch {b}"]["fraction_of_gd_examples"] for b in (256, 32, 1)]
    assert None not in fractions
    assert fractions[0] < 1.0 and fractions[1] < 0.5 and fractions[2] < 0.25
    assert fractions[2] < fractions[1] < fractions[0]  # smaller batches: fewer examples
    # ... but batch 1 is slower in wall time than full-batch GD on a vectorised machine
    numbers = json.loads((tmp_path / "gd-vs-sgd.json").read_text())
    assert reach["SGD batch 1"]["seconds"] > numbers["gd_seconds"]


@pytest.mark.slow
def test_momentum_smooths_the_update_direction(tmp_path: Path) -> None:
    numbers = _run("momentum-noise", tmp_path, quick=False)
    variance = [numbers["variance"][b] for b in ("0.0", "0.5", "0.9", "0.99")]
    assert variance[0] > 0.9  # plain SGD: consecutive minibatch directions nearly uncorrelated
    assert variance == sorted(variance, reverse=True) and variance[3] < 0.2
    best = numbers["best_final_loss"]
    assert best["0.99"] < best["0.0"] / 2  # at its best lr, momentum ends lower


@pytest.mark.slow
def test_normalised_methods_ignore_the_scale(tmp_path: Path) -> None:
    numbers = _run("badly-scaled", tmp_path)
    quad = numbers["quadratic"]
    for method in ("sign", "softsign 0.9", "Adam"):
        assert quad[method]["fraction_reduced_10x"] == 1.0
        assert quad[method]["relative_distance"] < 0.05
    assert quad["GD"]["fraction_reduced_10x"] < 0.6 and quad["GD"]["relative_distance"] > 0.3
    net = numbers["network"]
    assert net["softsign 0.9"]["final_loss"] < net["GD"]["final_loss"] / 10
    assert net["Adam"]["final_loss"] < net["GD"]["final_loss"] / 10
    # GD on the badly scaled features ends far above GD on the standardised ones
    assert net["GD"]["final_loss"] > 10 * numbers["network_gd_unscaled"]["final_loss"]


@pytest.mark.slow
def test_decay_narrows_the_gap_and_boxes_sign_methods(tmp_path: Path) -> None:
    numbers = _run("weight-decay", tmp_path)
    runs = numbers["overfit"]
    assert numbers["l2_vs_coupled_max_loss_difference"] < 1e-5  # the same gradient g + lambda*w
    for kind in ("L2 in the loss", "decoupled decay"):
        assert runs[kind]["loss_gap"] < 0.9 * runs["no decay"]["loss_gap"]
    for box in numbers["box"].values():
        assert box["initial_max_abs_weight"] > 2.5 * box["radius"]
        assert box["radius"] == pytest.approx(1 / box["lambda"])
        assert box["final_max_abs_weight"] <= box["bound_plus_lr"]


@pytest.mark.slow
def test_residual_nets_keep_the_gradient(tmp_path: Path) -> None:
    numbers = _run("depth", tmp_path)
    first = numbers["first_layer_gradient_norm"]
    assert numbers["residual_over_plain_sigmoid_first_layer_depth16"] > 1e6
    sigmoid = list(first["plain sigmoid"].values())
    assert sigmoid == sorted(sigmoid, reverse=True)  # vanishing, faster with depth
    assert min(first["residual sigmoid"].values()) > 0.1
    loss = numbers["final_loss_depth16"]
    assert loss["plain sigmoid"] > 2.0 and loss["residual sigmoid"] < 0.5 and loss["residual relu"] < 0.5


@pytest.mark.slow
def test_attention_ignores_the_order_of_the_points(tmp_path: Path) -> None:
    numbers = _run("point-sets", tmp_path)
    assert numbers["test_accuracy"]["attention, raster"] > 0.8
    assert abs(numbers["attention_drop_points"]) <= 1.0
    assert numbers["flat_mlp_drop_points"] > 15.0
