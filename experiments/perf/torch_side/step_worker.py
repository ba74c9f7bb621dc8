"""PyTorch training-step timer driven over stdin/stdout by experiments/perf/torch_compare.py.

Runs in .venv-torch. Each stdin line is a JSON command, answered by one JSON line:
  {"cmd": "setup", "model": "lenet"}          -> {"model", "parameters", "threads"}
  {"cmd": "time", "model": "lenet", "steps": n} -> {"model", "seconds_per_step"}
  {"cmd": "quit"}
"""

import argparse
import json
import sys
import time

import torch

from experiments.perf.torch_side import fedkl_models


class Job:
    """One model with the paper's optimizer and a fixed random batch."""

    def __init__(self, name, batch_size, seed):
        torch.manual_seed(seed)
        self.model = fedkl_models.build(name).train()
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4
        )
        self.loss = torch.nn.CrossEntropyLoss()
        self.images = torch.rand(batch_size, 3, 32, 32)
        self.labels = torch.randint(0, 10, (batch_size,))

    def step(self):
        self.optimizer.zero_grad()
        loss = self.loss(self.model(self.images), self.labels)
        loss.backward()
        self.optimizer.step()
        return loss

    def time(self, steps):
        start = time.perf_counter()
        for _ in range(steps):
            loss = self.step()
        loss.item()
        return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 keeps torch's default")
    parser.add_argument(
        "--interop_threads", type=int, default=0, help="torch.set_num_interop_threads; 0 keeps torch's default"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.batch_size < 1 or args.threads < 0 or args.interop_threads < 0:
        parser.error("--batch_size must be positive, --threads and --interop_threads non-negative")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.interop_threads:
        torch.set_num_interop_threads(args.interop_threads)
    jobs = {}
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "quit":
            break
        name = command["model"]
        if command["cmd"] == "setup":
            jobs[name] = Job(name, args.batch_size, args.seed)
            answer = {
                "model": name,
                "parameters": sum(p.numel() for p in jobs[name].model.parameters()),
                "threads": torch.get_num_threads(),
                "interop_threads": torch.get_num_interop_threads(),
                "torch": torch.__version__,
                "mkldnn": torch.backends.mkldnn.is_available(),
            }
        elif command["cmd"] == "time":
            answer = {"model": name, "seconds_per_step": jobs[name].time(int(command["steps"]))}
        else:
            answer = {"error": f"unknown command {command['cmd']!r}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
