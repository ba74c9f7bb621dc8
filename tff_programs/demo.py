"""The main job in a few minutes: FedKL on the bundled 'digits' data, then its accuracy matrix.

  python -m tff_programs.demo --root_dir=runs/demo        (what `make demo` runs)

Trains FedKL (3 clients, LeNet with the key-lock block) and, for comparison, FedAvg on the same
model without the lock, capturing what a curious server receives in the first and last rounds;
then evaluates who can use the FedKL model with which secret. Running it again resumes or reuses
the finished runs under --root_dir. `run_federated` is the reusable step (e.g. for an attack step
on its captures).
"""

import collections
import json
import os
import time

from absl import app
from absl import flags
from absl import logging

from tff_programs import common
from tff_programs import contexts
from tfkl import data
from tfkl.federated import evaluation, program

_ROOT_DIR = flags.DEFINE_string("root_dir", "runs/demo", "Directory of the demo's runs.")
_ROUNDS = flags.DEFINE_integer("rounds", 20, "Federated rounds of each run.", lower_bound=1)
_BASELINE = flags.DEFINE_bool("baseline", True, "Also train the FedAvg baseline (no lock) for comparison.")

program.ignore_tff_exit_noise()

DemoRun = collections.namedtuple("DemoRun", "root_dir config evaluation capture_paths")


def demo_config(algorithm="fedkl"):
    """LeNet on 'digits', 3 IID clients; 5 local epochs of batch 16 so the small data set trains."""
    return program.Config(algorithm=algorithm, model="lenet", dataset="digits", input_shape=(32, 32, 1),
                          num_classes=10, num_clients=3, clients_per_round=3, local_epochs=5, batch_size=16,
                          learning_rate=0.05, lr_milestones=(), seed=0)


def run_federated(root_dir, algorithm="fedkl", rounds=20, dataset=None, progress=True):
    """Trains (or resumes) one demo run under root_dir/<algorithm> and evaluates it.

    Needs an installed TFF context. Returns a DemoRun; `capture_paths` lists the captured updates
    (tfkl.capture files) of the first and last rounds.
    """
    run_dir = os.path.join(root_dir, algorithm)
    config = demo_config(algorithm)
    dataset = dataset or data.load(config.dataset)
    capture_rounds = (1, rounds)
    program.train(run_dir, config, program.RunOptions(rounds=rounds, capture_rounds=capture_rounds,
                                                      progress=progress), dataset=dataset)
    result = evaluation.evaluate(run_dir, round_num=rounds, public_sizes=(100, 1000), dataset=dataset)
    with open(os.path.join(run_dir, "evaluation.json"), "w") as f:
        json.dump(result, f, indent=1)
    captures_dir = os.path.join(run_dir, "captures")
    paths = sorted(os.path.join(captures_dir, p) for p in os.listdir(captures_dir))
    return DemoRun(run_dir, config, result, paths)


def main(argv):
    common.check_no_positional_args(argv)
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    started = time.time()
    dataset = common.load_dataset("digits")
    contexts.install_context()
    try:
        algorithms = ("fedkl", "fedavg") if _BASELINE.value else ("fedkl",)
        runs = {}
        for algorithm in algorithms:
            print(f"== {algorithm}: {_ROUNDS.value} rounds, 3 clients, LeNet on digits ==")
            runs[algorithm] = run_federated(_ROOT_DIR.value, algorithm, _ROUNDS.value, dataset)
    except program.ProgramError as e:
        common.fail(str(e))
    finally:
        contexts.shutdown()
    for algorithm, run in runs.items():
        print(evaluation.format_matrix(run.evaluation))
    print(f"captured updates (what a curious server receives): {len(runs['fedkl'].capture_paths)} files in "
          f"{os.path.join(runs['fedkl'].root_dir, 'captures')}")
    print(f"demo done in {time.time() - started:.0f} s; results in {_ROOT_DIR.value}/*/evaluation.json")


if __name__ == "__main__":
    app.run(main)
