"""Draw docs/figures/gradient_flow.png: per-layer gradient norms of depth-32, width-64 networks.

One batch (128 inputs ``N(0, I_16)``, 10 random classes, cross-entropy), seed 0, the same data for
every network. Prints each network's first-layer / last-layer gradient ratio.

    python benchmarks/gradient_flow_figure.py [--out docs/figures/gradient_flow.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from descend.diagnostics import gradient_flow, plot_gradient_flow
from descend.nn import MLP, ResidualMLP

OUT = Path(__file__).resolve().parent.parent / "docs" / "figures" / "gradient_flow.png"


def networks() -> dict[str, nn.Module]:
    def seeded(make):
        torch.manual_seed(0)
        return make()

    d, c = 16, 10
    return {
        "MLP sigmoid, PyTorch init": seeded(lambda: MLP(d, c, 64, 32, "sigmoid")),
        "MLP ReLU, PyTorch init": seeded(lambda: MLP(d, c, 64, 32, "relu")),
        "MLP tanh, gain 4": seeded(lambda: MLP(d, c, 64, 32, "tanh", init=4.0)),
        "MLP ReLU, He init": seeded(lambda: MLP(d, c, 64, 32, "relu", init="he")),
        "ResidualMLP ReLU, pre-norm": seeded(lambda: ResidualMLP(d, c, 64, 32, "relu")),
        "ResidualMLP sigmoid, pre-norm": seeded(lambda: ResidualMLP(d, c, 64, 32, "sigmoid")),
        "x + f(x) ReLU, no norm": seeded(lambda: ResidualMLP(d, c, 64, 32, "relu", norm=None)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    g = torch.Generator().manual_seed(1000)
    x, y = torch.randn(128, 16, generator=g), torch.randint(0, 10, (128,), generator=g)
    results = {name: gradient_flow(model, x, y, F.cross_entropy) for name, model in networks().items()}
    print("| network | layers | first / last | min / last | max / last |")
    print("|---|---:|---:|---:|---:|")
    for name, flow in results.items():
        v = list(flow.values())
        print(f"| {name} | {len(v)} | {v[0] / v[-1]:.2g} | {min(v) / v[-1]:.2g} | {max(v) / v[-1]:.2g} |")
    path = plot_gradient_flow(results, args.out, title="Gradient norm per layer, depth 32, width 64")
    print(f"\nwrote {path} ({path.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
