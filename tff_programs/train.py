"""Federated training, FedKL or the FedAvg baseline, resumable (tff.program state managers).

  python -m tff_programs.train --algorithm=fedkl --model=lenet --dataset=fashion_mnist \
      --num_clients=3 --clients_per_round=3 --rounds=20 --root_dir=runs/fedkl

Run the same command again after an interruption: training resumes from the last complete round.
Per-client private state (key, lock, optimizer buffers) is kept under root_dir/clients, apart from
the server state (root_dir/server); metrics go to root_dir/metrics.csv and root_dir/tensorboard.
"""

import math

from absl import flags, logging

from tff_programs import common, contexts, launch
from tfkl import names

_ROOT_DIR = flags.DEFINE_string("root_dir", None, "Directory of the run (state, metrics, captures).")
_ALGORITHM = flags.DEFINE_enum(
    "algorithm",
    "fedkl",
    names.ALGORITHMS,
    "FedKL; the FedAvg baseline (the backbone without the lock); or fedavg-norm, the FedAvg control (the "
    "lock blocks replaced by a plain --normalization with a learned affine: no key, no lock).",
)
_MODEL = flags.DEFINE_enum("model", "lenet", names.MODELS, "Zoo model.")
_DATASET = flags.DEFINE_enum("dataset", "digits", names.DATASETS, "Data set.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where the data set's files are.")
_NUM_CLIENTS = flags.DEFINE_integer("num_clients", 3, "Number of clients.")
_CLIENTS_PER_ROUND = flags.DEFINE_integer("clients_per_round", None, "Clients sampled per round (default: all).")
_ROUNDS = flags.DEFINE_integer("rounds", 20, "Total rounds (a resumed run continues to this).", lower_bound=1)
_LOCAL_EPOCHS = flags.DEFINE_integer("local_epochs", 1, "Local epochs per round.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Client batch size.")
_EXAMPLES_PER_CLIENT = flags.DEFINE_integer(
    "examples_per_client",
    None,
    "Each client trains on at most this many examples of its partition, drawn from --seed "
    "(default: all of them); the same every round unless --fresh_examples.",
)
_FRESH_EXAMPLES = flags.DEFINE_bool(
    "fresh_examples", False, "Each round each client draws a new subset of --examples_per_client examples."
)
_SPLIT = flags.DEFINE_enum("split", "iid", names.SPLITS, "How the training set is split among clients.")
_ALPHA = flags.DEFINE_float("alpha", 0.5, "Dirichlet concentration for --split=dirichlet.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 0.01, "Client SGD learning rate.")
_MOMENTUM = flags.DEFINE_float("momentum", 0.9, "Client SGD momentum.")
_NESTEROV = flags.DEFINE_bool("nesterov", True, "Nesterov momentum.")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 5e-4, "Coupled weight decay.")
_LR_MILESTONES = flags.DEFINE_list(
    "lr_milestones", ["60", "120", "160"], "Rounds after which the client LR is multiplied by --lr_gamma."
)
_LR_GAMMA = flags.DEFINE_float("lr_gamma", 0.2, "LR factor at each milestone.")
_SERVER_LR = flags.DEFINE_float("server_learning_rate", 1.0, "Server SGD learning rate (1.0: plain FedAvg).")
_PERSIST = flags.DEFINE_bool("persist_optimizer_state", True, "Keep each client's momentum buffers across rounds.")
_STATISTICS = flags.DEFINE_enum(
    "statistics",
    "average",
    names.STATISTICS,
    "Moving statistics of the normalisations: averaged by the server (the paper), or "
    "kept by each client (FedBN-like; backbones that normalise after the lock, such as "
    "ResNet-20, need it: each client's lock shifts the statistics).",
)
_WEIGHTING = flags.DEFINE_enum(
    "client_weighting", "num_examples", names.CLIENT_WEIGHTINGS, "Weight of each client's update in the mean."
)
_KEY_DIM = flags.DEFINE_integer("key_dim", 1024, "Key length (FedKL).", lower_bound=1)
_KEY_DISTRIBUTION = flags.DEFINE_enum(
    "key_distribution",
    "uniform",
    names.KEY_DISTRIBUTIONS,
    "FedKL: distribution of the clients' keys (CSPRNG): uniform in [0, 1) (the paper's), zero-mean unit-variance "
    "gaussian, or rademacher (+-1). The evaluation's random keys come from it too.",
)
_RANDOM_KEY_PENALTY = flags.DEFINE_float(
    "random_key_penalty",
    0.0,
    "FedKL: weight of a training term that pushes the predictions under a fresh random key (one extra "
    "forward pass per step) towards uniform; 0 leaves it out.",
)
_NORMALIZATION = flags.DEFINE_enum(
    "normalization", "batch", names.NORMALIZATIONS, "Lock normalisation (fedavg-norm: the control's)."
)
_INIT = flags.DEFINE_enum("init", "pytorch", names.INITS, "Weight initialisation scheme.")
_LOCK_WHERE = flags.DEFINE_enum(
    "lock_where",
    "first",
    names.LOCK_WHERES,
    "FedKL: lock the first conv layer (the paper's), the first two or every conv layer, all with the client's one key.",
)
_LOCK_AFFINE = flags.DEFINE_enum(
    "lock_affine",
    "channel",
    names.LOCK_AFFINES,
    "FedKL: the lock's gamma/beta per channel (the paper's) or per position and channel (spatial).",
)
_LOCK_KERNEL = flags.DEFINE_enum(
    "lock_kernel",
    "full",
    names.LOCK_KERNELS,
    "FedKL: the lock kernels as variables (key_dim x affine size each), or compact: gain * W0 + "
    "outer(key, delta) with W0 drawn from a private seed (the same training, a fraction of the private state).",
)
_LOCK_NOISE = flags.DEFINE_float(
    "lock_noise",
    0.0,
    "FedKL: strength s of a secret noise on the lock in training: each round a client scales its gamma by "
    "(1 + s * e1) and shifts its beta by gamma * s * e2 (e1, e2 standard normal per entry, drawn from its key "
    "and the round), which a server that pools its captures cannot model. 0: none (the paper's).",
)
_LOCK_INIT = flags.DEFINE_enum(
    "lock_init",
    "shared",
    names.LOCK_INITS,
    "FedKL: every client starts from "
    "model_fn's lock weights (the paper's; the server knows them in round 1), or from "
    "lock weights it draws from the CSPRNG.",
)
_DP_CLIP = flags.DEFINE_float(
    "dp_clip",
    None,
    "DP-FedAvg: clip each client's update to this L2 norm (TFF's "
    "DifferentiallyPrivateFactory.gaussian_fixed; needs --client_weighting=uniform).",
)
_DP_NOISE = flags.DEFINE_float("dp_noise_multiplier", 0.0, "DP-FedAvg: noise stddev on the sum, in units of --dp_clip.")
_PRUNE = flags.DEFINE_float(
    "prune_fraction",
    None,
    "Each client zeroes this fraction of the smallest-magnitude "
    "entries of each tensor of its update (gradient pruning).",
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of weights, split, sampling and data order.")
_SEEDED_KEYS = flags.DEFINE_bool(
    "seeded_keys", False, "Derive client keys from --seed (experiments only; default: CSPRNG keys)."
)
_CAPTURE = flags.DEFINE_list(
    "capture_rounds",
    [],
    "Rounds whose client updates are captured as a curious server sees them ('all' for every round).",
)
_CACHE = flags.DEFINE_bool(
    "cache_client_data",
    True,
    "Keep each client's examples in a file under "
    "root_dir/client_data: rounds ship a path, not the examples (about 2x faster).",
)
_KEEP = flags.DEFINE_integer("keep_rounds", 5, "Complete rounds of state kept on disk.", lower_bound=1)
_INJECT_NAN = flags.DEFINE_list("inject_nan", [], "Fault injection: ROUND:CLIENT pairs whose data become NaN.")
_INJECT_FAILURE = flags.DEFINE_list(
    "inject_failure", [], "Fault injection: ROUND:CLIENT pairs whose local training fails mid-epoch."
)

flags.mark_flag_as_required("root_dir")


def _parse_int_list(values):
    return all(v.strip().isdigit() and int(v) >= 1 for v in values)


def _parse_pairs(values):
    pairs = []
    for value in values:
        round_num, _, client = value.partition(":")
        if not (round_num.isdigit() and client.isdigit()):
            raise ValueError(value)
        pairs.append((int(round_num), str(int(client))))
    return tuple(pairs)


def _valid_pairs(values):
    try:
        _parse_pairs(values)
        return True
    except ValueError:
        return False


def _number_rule(name, holds, rule):
    """Registers a checker of flag `name`: None or a finite number for which `holds`."""

    def check(value):
        if value is not None and not (math.isfinite(value) and holds(value)):
            raise flags.ValidationError(f"--{name} must {rule}, got {value}")
        return True

    flags.register_validator(name, check)


def _check_fault_clients(values):
    """The fault injection's clients exist (ids below --num_clients)."""
    for name in ("inject_nan", "inject_failure"):
        for round_num, client in _parse_pairs(values[name]):
            if int(client) >= values["num_clients"] or round_num < 1:
                raise flags.ValidationError(
                    f"--{name}={round_num}:{client} names no round and client of this run (rounds from 1, "
                    f"clients 0..{values['num_clients'] - 1})"
                )
    return True


# The flags' own syntax and ranges, before TensorFlow loads: the rules between fields of the run's
# configuration are checked by config_lib.Config.
flags.register_validator("root_dir", lambda v: bool(v), "--root_dir must not be empty")
flags.register_validator("root_dir", common.writable_dir_validator("root_dir"))
flags.register_validator(
    "root_dir",
    lambda v: not common.holds_demo_run(v),
    "--root_dir holds the runs of tff_programs.demo; use another",
)
for _name in ("num_clients", "clients_per_round", "local_epochs", "batch_size", "examples_per_client"):
    _number_rule(_name, lambda v: v >= 1, "be at least 1")
for _name in ("learning_rate", "server_learning_rate", "lr_gamma", "alpha", "dp_clip"):
    _number_rule(_name, lambda v: v > 0, "be positive and finite")
for _name in ("momentum", "weight_decay", "dp_noise_multiplier", "random_key_penalty", "prune_fraction", "lock_noise"):
    _number_rule(_name, lambda v: v >= 0, "not be negative, and be finite")
flags.register_validator("lr_milestones", _parse_int_list, "--lr_milestones must be a list of round numbers (>= 1)")
flags.register_validator(
    "capture_rounds",
    lambda v: v == ["all"] or _parse_int_list(v),
    "--capture_rounds must be 'all' or a list of round numbers (>= 1)",
)
flags.register_validator("inject_nan", _valid_pairs, "--inject_nan takes ROUND:CLIENT pairs, e.g. 2:0,3:1")
flags.register_validator("inject_failure", _valid_pairs, "--inject_failure takes ROUND:CLIENT pairs, e.g. 2:0")
flags.register_multi_flags_validator(["inject_nan", "inject_failure", "num_clients"], _check_fault_clients)


def config_from_flags(dataset):
    """The run's Config from the flags (and the data set's shape)."""
    from tfkl import models
    from tfkl.federated import config as config_lib

    return config_lib.Config(
        algorithm=_ALGORITHM.value,
        model=_MODEL.value,
        dataset=_DATASET.value,
        data_dir=_DATA_DIR.value,
        input_shape=models.input_shape(_MODEL.value, dataset),
        num_classes=dataset.num_classes,
        num_clients=_NUM_CLIENTS.value,
        clients_per_round=_CLIENTS_PER_ROUND.value or _NUM_CLIENTS.value,
        local_epochs=_LOCAL_EPOCHS.value,
        batch_size=_BATCH_SIZE.value,
        examples_per_client=_EXAMPLES_PER_CLIENT.value,
        fresh_examples=_FRESH_EXAMPLES.value,
        split=_SPLIT.value,
        alpha=_ALPHA.value,
        learning_rate=_LEARNING_RATE.value,
        momentum=_MOMENTUM.value,
        nesterov=_NESTEROV.value,
        weight_decay=_WEIGHT_DECAY.value,
        lr_milestones=tuple(int(m) for m in _LR_MILESTONES.value),
        lr_gamma=_LR_GAMMA.value,
        server_learning_rate=_SERVER_LR.value,
        persist_optimizer_state=_PERSIST.value,
        statistics=_STATISTICS.value,
        client_weighting=_WEIGHTING.value,
        key_dim=_KEY_DIM.value,
        key_distribution=_KEY_DISTRIBUTION.value,
        random_key_penalty=_RANDOM_KEY_PENALTY.value,
        normalization=_NORMALIZATION.value,
        init=_INIT.value,
        seed=_SEED.value,
        seeded_keys=_SEEDED_KEYS.value,
        lock_where=_LOCK_WHERE.value,
        lock_init=_LOCK_INIT.value,
        lock_affine=_LOCK_AFFINE.value,
        lock_kernel=_LOCK_KERNEL.value,
        lock_noise=_LOCK_NOISE.value,
        dp_clip=_DP_CLIP.value,
        dp_noise_multiplier=_DP_NOISE.value,
        prune_fraction=_PRUNE.value,
    )


def run_options():
    from tfkl.federated import program

    capture = ("all",) if _CAPTURE.value == ["all"] else tuple(int(r) for r in _CAPTURE.value)
    return program.RunOptions(
        rounds=_ROUNDS.value,
        capture_rounds=capture,
        keep_rounds=_KEEP.value,
        cache_client_data=_CACHE.value,
        inject_nan=_parse_pairs(_INJECT_NAN.value),
        inject_failure=_parse_pairs(_INJECT_FAILURE.value),
    )


def quiet_logs():
    """Warnings and errors only (TF and TFF log every checkpoint at INFO), unless --verbosity is given."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def main(argv):
    from tfkl.federated import config as config_lib
    from tfkl.federated import program

    del argv  # launch.parse_flags refused positional arguments
    quiet_logs()
    dataset = common.load_dataset(_DATASET.value, _DATA_DIR.value)
    try:
        config = config_from_flags(dataset)
    except config_lib.ConfigError as e:
        common.fail(str(e))
    contexts.install_context()
    try:
        metrics = program.train(_ROOT_DIR.value, config, run_options(), dataset=dataset)
    except config_lib.ProgramError as e:
        common.fail(str(e))
    except contexts.WorkerFailedError as e:
        common.fail(
            f"{e}; with the worker running again (or left out of --workers), the same command resumes "
            "from the last complete round"
        )
    finally:
        contexts.shutdown()
    if metrics is not None:
        logging.info("final round metrics: %s", metrics)
        print(f"done: {_ROOT_DIR.value} at round {_ROUNDS.value}")


if __name__ == "__main__":
    contexts.ignore_tff_exit_noise()  # before the flags: a flag error ends the program before main
    launch.run(main)
