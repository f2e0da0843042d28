"""Compose your own optimizer from descend's rules, read its equations, train with it.

    python examples/compose_chain.py                 # DESCEND_EXAMPLE_QUICK=1: a few steps only

The chain below is EMA momentum, then the soft sign u/(|u|+eps), then decoupled weight decay: a sign-like
method whose weights decay towards the box |w| <= 1/lambda. ``optim.constraint_state`` reads how close the
weights are to that box.
"""

import os

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from descend import optim
from descend.nn import MLP

QUICK = os.environ.get("DESCEND_EXAMPLE_QUICK") == "1"
STEPS = 20 if QUICK else 1000

torch.manual_seed(0)
digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16
y = torch.tensor(digits.target)
model = MLP(64, 10, width=128, depth=2)

# two param groups: decay the weight matrices, not the biases (rule hyperparameters are group keys)
matrices = [p for p in model.parameters() if p.ndim > 1]
biases = [p for p in model.parameters() if p.ndim == 1]
opt = optim.chain(
    [{"params": matrices}, {"params": biases, "weight_decay": 0.0}],
    optim.clip_by_global_norm(1.0),  # clip the gradient of all parameters together first
    optim.ema(0.9),  # m <- 0.9 m + 0.1 u
    optim.softsign(1e-3),  # u <- u / (|u| + 1e-3)
    optim.decoupled_decay(2.0),  # w <- (1 - lr * 2) w: keeps |w| within 1/2 (plus lr)
    lr=3e-3,
)
print(optim.explain(opt))

# torch's schedulers work unchanged: cosine decay of lr over the run
schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
for step in range(STEPS):
    idx = torch.randint(0, len(x), (64,))
    loss = F.cross_entropy(model(x[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    schedule.step()
    if step % max(1, STEPS // 5) == 0 or step == STEPS - 1:
        print(f"step {step:5d}  loss {loss.item():.4f}")

for group, state in enumerate(optim.constraint_state(opt)):
    print(f"group {group}: {state}")
