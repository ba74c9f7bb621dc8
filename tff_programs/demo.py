"""The main job in a few minutes: FedKL on 'digits', its accuracy matrix, and attacks on captures.

  python -m tff_programs.demo --root_dir=runs/demo        (what `make demo` runs)

Trains FedKL (3 clients, LeNet with the key-lock block) and, for comparison, FedAvg on the same
model without the lock, capturing what a curious server receives in the first and last rounds;
then evaluates who can use the FedKL model with which secret. Finally a curious server attacks a
captured update: one round of FedAvg and of FedKL in which a client with a handful of images takes
one local step, inverted without the lock and, with it, by the paper's fixed-key attacker and the
adaptive one. Running it again resumes or reuses the finished runs under --root_dir.
"""

import collections
import dataclasses
import json
import os
import time

from absl import flags, logging

from tff_programs import common, contexts, launch

_ROOT_DIR = flags.DEFINE_string("root_dir", "runs/demo", "Directory of the demo's runs.")
_ROUNDS = flags.DEFINE_integer("rounds", 20, "Federated rounds of each run.", lower_bound=1)
_BASELINE = flags.DEFINE_bool("baseline", True, "Also train the FedAvg baseline (no lock) for comparison.")
_ATTACK = flags.DEFINE_bool("attack", True, "Attack a captured single-step update with and without the lock.")
_ATTACK_ITERATIONS = flags.DEFINE_integer(
    "attack_iterations", 400, "Iterations of the demo's iDLG attack.", lower_bound=1
)

DemoRun = collections.namedtuple("DemoRun", "root_dir config evaluation capture_paths")


def demo_config(algorithm="fedkl"):
    """LeNet on 'digits', 3 IID clients; 5 local epochs of batch 16 so the small data set trains.

    The clients' keys derive from the seed (`seeded_keys`), so that reruns reproduce the demo's figures: a
    demonstration, never a deployment, whose keys must come from the CSPRNG (`tff_programs.train`'s default).
    """
    from tfkl.federated.config import Config

    return Config(
        algorithm=algorithm,
        model="lenet",
        dataset="digits",
        input_shape=(32, 32, 1),
        num_classes=10,
        num_clients=3,
        clients_per_round=3,
        local_epochs=5,
        batch_size=16,
        learning_rate=0.05,
        lr_milestones=(),
        seed=0,
        seeded_keys=True,
    )


def run_federated(root_dir, algorithm="fedkl", rounds=20, dataset=None, progress=True):
    """Trains (or resumes) one demo run under root_dir/<algorithm> and evaluates it.

    Needs an installed TFF context. Returns a DemoRun; `capture_paths` lists the captured updates
    (tfkl.capture files) of the first and last rounds.
    """
    from attacks import lock_recovery
    from tfkl import data
    from tfkl.federated import evaluation, program

    run_dir = os.path.join(root_dir, algorithm)
    config = demo_config(algorithm)
    dataset = dataset or data.load(config.dataset)
    capture_rounds = (1, rounds)
    program.train(
        run_dir,
        config,
        program.RunOptions(rounds=rounds, capture_rounds=capture_rounds, progress=progress),
        dataset=dataset,
    )
    result = evaluation.evaluate(
        run_dir,
        round_num=rounds,
        public_sizes=(100, 1000),
        dataset=dataset,
        progress=progress,
        lock_recovery=lock_recovery.recover,
    )
    with open(os.path.join(run_dir, "evaluation.json"), "w") as f:
        json.dump(result, f, indent=1)
    captures_dir = os.path.join(run_dir, "captures")
    paths = sorted(os.path.join(captures_dir, p) for p in os.listdir(captures_dir))
    return DemoRun(run_dir, config, result, paths)


def victim_config(algorithm):
    """The attacked round: 360 clients of about 4 digits each, one sampled, one local step."""
    return dataclasses.replace(
        demo_config(algorithm),
        num_clients=360,
        clients_per_round=1,
        local_epochs=1,
        batch_size=4,
        learning_rate=0.01,
        persist_optimizer_state=False,
    )


def capture_victim_round(root_dir, algorithm, dataset):
    """Trains the one attacked round under root_dir/victim_<algorithm>; returns its capture path."""
    from tfkl.federated import program

    run_dir = os.path.join(root_dir, f"victim_{algorithm}")
    program.train(
        run_dir,
        victim_config(algorithm),
        program.RunOptions(rounds=1, capture_rounds=(1,), progress=False),
        dataset=dataset,
    )
    captures_dir = os.path.join(run_dir, "captures")
    (name,) = os.listdir(captures_dir)
    return os.path.join(captures_dir, name)


def attack_step(captures, out_dir, iterations):
    """Inverts the captured updates as a curious server; prints the table and writes the PNG grid."""
    import attacks
    from attacks import cases
    from tfkl import capture as capture_lib

    loaded = {name: capture_lib.load_capture(path) for name, path in captures.items()}
    clients = {c.meta["client_id"] for c in loaded.values()}
    if len(clients) != 1:
        raise ValueError(f"the captures come from different clients {sorted(clients)}")
    truth = cases.capture_user_data(next(iter(loaded.values())).meta)
    return attacks.attack_captures(
        captures,
        out_dir,
        attack="idlg",
        attack_options={"iterations": iterations, "restarts": 2},
        truth_images=truth.images,
        truth_labels=truth.labels,
        verbose=False,
    )


def main(argv):
    import tensorflow as tf

    from tfkl.federated import evaluation
    from tfkl.federated.config import ProgramError

    del argv  # launch.parse_flags refused positional arguments
    # Deterministic ops here and in TFF's worker (it inherits the variable), with the seeded keys: reruns agree.
    os.environ["TF_DETERMINISTIC_OPS"] = "1"
    tf.config.experimental.enable_op_determinism()
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
        if _ATTACK.value:
            print("== a curious server captures one round of a client with 4 images (FedAvg and FedKL) ==")
            captures = {
                algorithm: capture_victim_round(_ROOT_DIR.value, algorithm, dataset)
                for algorithm in ("fedavg", "fedkl")
            }
    except (ProgramError, contexts.WorkerFailedError) as e:
        common.fail(str(e))
    finally:
        contexts.shutdown()
    for run in runs.values():
        print(evaluation.format_matrix(run.evaluation))
    print(
        f"captured updates (what a curious server receives): {len(runs['fedkl'].capture_paths)} files in "
        f"{os.path.join(runs['fedkl'].root_dir, 'captures')}"
    )
    if _ATTACK.value:
        out_dir = os.path.join(_ROOT_DIR.value, "attack")
        print(
            "== iDLG on the captured updates: fedavg/none (no lock), fedkl/fixed-key (the paper's "
            "attacker), fedkl/adaptive =="
        )
        attack_step(captures, out_dir, _ATTACK_ITERATIONS.value)
        with open(os.path.join(out_dir, "captures_table.txt")) as f:
            print(f.read())
        print(f"reconstructions (truth on top): {os.path.join(out_dir, 'captures_grid.png')}")
        print(
            "note: a capture holds no secret, so no 'oracle' attacker (key and lock known) runs here; whether "
            "a failure is the secret's doing or the lock block's normalisation is measured by "
            "`python -m benchmarks.attack_quality` (threats none / oracle / fixed-key / adaptive)."
        )
    print(f"demo done in {time.time() - started:.0f} s; results in {_ROOT_DIR.value}/*/evaluation.json")


if __name__ == "__main__":
    contexts.ignore_tff_exit_noise()  # before the flags: a flag error ends the program before main
    launch.run(main)
