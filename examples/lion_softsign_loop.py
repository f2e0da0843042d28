"""Lion and Softsign in your own PyTorch loop: a descend optimizer is a torch.optim.Optimizer.

    python examples/lion_softsign_loop.py            # DESCEND_EXAMPLE_QUICK=1: a few steps only

Trains the same MLP on scikit-learn's digits with torch's AdamW, descend's Lion and descend's Softsign,
from the same initial weights and the same minibatches, and prints each one's test accuracy.
"""

import copy
import os

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from descend import optim
from descend.nn import MLP

QUICK = os.environ.get("DESCEND_EXAMPLE_QUICK") == "1"
STEPS = 20 if QUICK else 1500

torch.manual_seed(0)
digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16  # pixel intensities 0..16 -> 0..1
y = torch.tensor(digits.target)
perm = torch.randperm(len(x))
train, test = perm[:1400], perm[1400:]
batches = torch.randint(0, len(train), (STEPS, 32))  # the same minibatches for every optimizer

initial = MLP(64, 10, width=128, depth=2)
optimizers = {
    # sign methods step every weight by about lr, so they take smaller learning rates than AdamW
    "torch AdamW": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01),
    "descend Lion": lambda p: optim.Lion(p, lr=3e-4, weight_decay=0.1),
    "descend Softsign": lambda p: optim.Softsign(p, lr=1e-3, weight_decay=0.1),
}

for name, make in optimizers.items():
    model = copy.deepcopy(initial)
    opt = make(model.parameters())
    for step in range(STEPS):
        idx = train[batches[step]]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = (model(x[test]).argmax(dim=1) == y[test]).float().mean().item()
    print(f"{name:18s} test accuracy {accuracy:.3f} after {STEPS} steps")

# the update the last optimizer applied, rule by rule
print(optim.explain(opt))
