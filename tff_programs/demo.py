"""The main job in a few minutes: FedKL on 'digits' against the FedAvg control, its key table, and the
strongest adaptive attack on captured updates.

  python -m tff_programs.demo --root_dir=runs/demo        (what `make demo` runs)

Trains FedKL (3 clients, LeNet with the key-lock block) and, for comparison, the FedAvg control
(`--algorithm=fedavg-norm`: the same LeNet and normalisation with a learned affine in place of the
lock, no key), then evaluates who can use the FedKL model with which secret. Finally a curious server
attacks one captured round of each, in which a client with 4 images takes one local step: without the
lock (the control), and with it by the paper's attacker (a random key: fixed-key) and by the adaptive
one (gamma/beta learned with the images). The attack is GRNN, chosen by the published results, not by
this run: the strongest adaptive attacker in results/candidates.md (97 % at batch 1) and
results/regimes.md (G8-GRNN, U8-GRNN). Running it again resumes or reuses the finished runs under
--root_dir.
"""

import collections
import dataclasses
import json
import os
import time

from absl import flags, logging

from tff_programs import common, contexts, launch

_ROOT_DIR = flags.DEFINE_string("root_dir", "runs/demo", "Directory of the demo's runs.")
flags.register_validator(
    "root_dir",
    lambda v: not os.path.exists(os.path.join(v, "config.json")),
    "--root_dir holds a training run; use another",
)
flags.register_validator("root_dir", common.writable_dir_validator("root_dir"))
_ROUNDS = flags.DEFINE_integer("rounds", 20, "Federated rounds of each run.", lower_bound=1)
_BASELINE = flags.DEFINE_bool(
    "baseline", True, "Also train the FedAvg control (same normalisation, learned affine, no key) for comparison."
)
_ATTACK = flags.DEFINE_bool("attack", True, "Attack a captured single-step update with and without the lock.")
_ATTACK_ITERATIONS = flags.DEFINE_integer(
    "attack_iterations", 2000, "Iterations of the demo's GRNN attack (results/regimes.md's for updates).", lower_bound=1
)

CONTROL = "fedavg-norm"  # the FedAvg control: FedKL's model with a learned affine in place of the lock
ATTACK = "grnn"  # the strongest adaptive attacker in results/candidates.md and results/regimes.md
ATTACK_NAME = "GRNN"
ATTACK_RESTARTS = 2  # results/regimes.md's budget for updates (U8-GRNN: 2000 iterations, 2 restarts)
SETTINGS = {  # capture/threat -> who attacks what
    f"{CONTROL}/none": "FedAvg control: nothing hidden",
    "fedkl/fixed-key": "FedKL, the paper's attacker: a random key",
    "fedkl/adaptive": "FedKL, adaptive attacker: gamma/beta learned",
}
PUBLISHED = (  # results/regimes.md, row U8-GRNN (commit ab0b5cf): the full-budget benchmark of the same attack
    "on 48 images per threat (3 seeds, clients of 8 images in 4 local steps; results/regimes.md, U8-GRNN) the same "
    "attack recovered: none 33/48 = 69 %, fixed-key 0/48 = 0 %, adaptive 20/48 = 42 % [29, 56] %"
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
        public_sizes=(100,),
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
    """Inverts the captured updates as a curious server with GRNN; writes the grid, the table and the metrics
    under out_dir and returns {setting: result} (`attacks.attack_captures`)."""
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
        attack=ATTACK,
        attack_options={"iterations": iterations, "restarts": ATTACK_RESTARTS},
        truth_images=truth.images,
        truth_labels=truth.labels,
        verbose=False,
    )


def _percent(value):
    return f"{100 * value:.1f} %"


def accuracy_lines(runs):
    """What was trained and how well each model classifies the held-out digits."""
    lines = [f"trained: LeNet on digits, 3 clients, {_ROUNDS.value} rounds of FedAvg"]
    fedkl = runs["fedkl"].evaluation
    lines.append(
        f"  FedKL (key-lock block), each client's own key and lock: {_percent(fedkl['a_own_key_and_lock']['mean'])}"
    )
    if CONTROL in runs:
        control = runs[CONTROL].evaluation["global"]
        lines.append(f"  FedAvg control (same normalisation, learned affine, no key):  {_percent(control)}")
    return lines


def key_table_lines(evaluation):
    """The key table in words: what the key, the lock weights and public data give whoever holds them."""
    own, random_key = evaluation["a_own_key_and_lock"]["mean"], evaluation["b_own_lock_random_key"]["mean"]
    if own - random_key <= 0.05:
        verdict = "about as well as the client's own key", "the key alone does not lock the model"
    else:
        verdict = "below the client's own key", "the key matters"
    lines = [
        "what the secret protects (tff_programs.evaluate's key table):",
        f"  a random key with the client's own lock weights scores {_percent(random_key)}, {verdict[0]} "
        f"({_percent(own)}): {verdict[1]}",
        f"  the global model as the server holds it (lock weights zero): {_percent(evaluation['d_global_zero_lock'])}"
        ": what the server lacks is the clients' lock weights",
    ]
    for size, recovery in evaluation["e_lock_recovery"].items():
        scratch = evaluation["e_from_scratch"][size]
        lines.append(
            f"  a thief with {recovery['examples']} public labelled images who re-learns the lock: "
            f"{_percent(recovery['accuracy'])}; training from scratch on them: {_percent(scratch['accuracy'])} "
            f"({100 * scratch['recovery_minus_scratch']:+.1f} pp: what the shared weights give beyond its own data)"
        )
    return lines


def attack_lines(results, iterations, grid):
    """What each attacker recovered of the client's images, under each threat."""
    from attacks import experiment

    n = next(iter(results.values()))["success"]["n"]
    lines = [
        f"what a curious server rebuilt of one client's {n} images from one captured round ({ATTACK_NAME}, "
        f"{iterations} iterations, {ATTACK_RESTARTS} restarts; recovered = aligned SSIM >= 0.6, 95 % Wilson "
        "interval):"
    ]
    for setting, result in results.items():
        threat = setting.split("/")[1]
        lines.append(
            f"  {threat:<10} {SETTINGS.get(setting, setting):<46} {experiment.format_success(result['success'])}"
        )
    lines += [f"  {PUBLISHED}", f"labelled grid (truth on top, one row per attacker): {grid}"]
    return lines


def train_and_capture(dataset):
    """Trains the demo's runs and the attacked rounds; returns (runs, captures or None)."""
    algorithms = ("fedkl", CONTROL) if _BASELINE.value else ("fedkl",)
    runs, captures = {}, None
    for algorithm in algorithms:
        print(f"== {algorithm}: {_ROUNDS.value} rounds, 3 clients, LeNet on digits ==")
        runs[algorithm] = run_federated(_ROOT_DIR.value, algorithm, _ROUNDS.value, dataset)
    if _ATTACK.value:
        print(f"== a curious server captures one round of a client with 4 images ({CONTROL} and fedkl) ==")
        captures = {
            algorithm: capture_victim_round(_ROOT_DIR.value, algorithm, dataset) for algorithm in (CONTROL, "fedkl")
        }
    return runs, captures


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
        runs, captures = train_and_capture(dataset)
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
    summary = accuracy_lines(runs) + key_table_lines(runs["fedkl"].evaluation)
    if captures:
        out_dir = os.path.join(_ROOT_DIR.value, "attack")
        print(f"== {ATTACK_NAME} on the captured updates: {', '.join(SETTINGS)} ==")
        results = attack_step(captures, out_dir, _ATTACK_ITERATIONS.value)
        with open(os.path.join(out_dir, "captures_table.txt")) as f:
            print(f.read())
        summary += attack_lines(results, _ATTACK_ITERATIONS.value, os.path.join(out_dir, "captures_grid.png"))
    print(f"== in short (demo done in {time.time() - started:.0f} s; results in {_ROOT_DIR.value}) ==")
    print("\n".join(summary))


if __name__ == "__main__":
    contexts.ignore_tff_exit_noise()  # before the flags: a flag error ends the program before main
    launch.run(main)
