"""The points torch.optim.LBFGS (no line search) evaluates on a tiny smooth problem: the expected
values of tests/test_lbfgs.py, which checks `attacks.lbfgs.TorchLBFGS` against them without torch.

  .venv-torch/bin/python -m experiments.perf.torch_side.lbfgs_trajectory
"""

import json

import torch

# The problem of tests/test_lbfgs.py: softplus regression + ridge + sine, 4 unknowns.
A = [[1.0, 2.0, -1.0, 0.5], [0.3, -1.0, 2.0, 1.0], [2.0, 0.1, 0.4, -0.7]]
B = [0.5, -1.0, 2.0]
START = [1.5, -2.0, 0.7, 3.0]
OPTIONS = dict(lr=1, max_iter=4, history_size=2)
STEPS = 12


def main():
    torch.set_num_threads(1)
    a, b = torch.tensor(A), torch.tensor(B)
    x = torch.tensor(START, requires_grad=True)
    optimizer = torch.optim.LBFGS([x], **OPTIONS)
    evaluated = []

    def closure():
        optimizer.zero_grad()
        evaluated.append([round(v, 6) for v in x.detach().tolist()])
        loss = torch.nn.functional.softplus(a @ x - b).sum() + 0.05 * (x**2).sum() + 0.1 * torch.sin(x).sum()
        loss.backward()
        return loss

    for _ in range(STEPS):
        optimizer.step(closure)
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "options": OPTIONS,
                "steps": STEPS,
                "evaluated": evaluated,
                "final": [round(v, 6) for v in x.detach().tolist()],
            }
        )
    )


if __name__ == "__main__":
    main()
