"""The honest evaluation of a FedKL run: who can use the trained model, with which secret.

The test split is cut once (seeded) into a public part an attacker may hold (for lock recovery)
and the evaluation part every accuracy is measured on, so the two never overlap. Lock recovery is
an attack: `evaluate` takes it as an argument (`attacks.lock_recovery.recover`) for entry (e).
"""

import dataclasses
import functools

import numpy as np
import tensorflow as tf

from tfkl import data as data_lib
from tfkl import private
from tfkl.federated import client_work, run_dir
from tfkl.federated.client_data import client_partition
from tfkl.federated.config import ProgramError, build_process
from tfkl.training import accuracy, classification_loss

ENTRIES = {
    "a_own_key_and_lock": "each client: global shared weights + its own key and lock weights (the paper's FedKL "
    "accuracy)",
    "b_own_lock_random_key": "each client's own lock weights under a fresh random key (of the run's key distribution)",
    "c_own_lock_other_key": "each client's own lock weights under the next client's key",
    "c_other_key_and_lock": "the next client's key and lock weights in this client's model (same as that client's "
    "model unless statistics are kept local)",
    "d_global_zero_lock": "the global model alone as the server holds it: lock weights zero (gamma = beta = 0), "
    "any key",
    "d_global_fresh_lock_random_key": "the global model alone with freshly initialised lock weights and a random key",
    "f_own_secret_own_statistics": "each client: entry (a) after re-estimating the moving statistics on its own "
    "training data (train-mode forward passes, no weight changes), as a client can "
    "before deploying",
    "e_lock_recovery": "an attacker holding the global model fine-tunes the lock layers on N public labelled test "
    "examples (held out from the evaluation examples), from a fresh lock with a random key and from zero kernels "
    "(gamma and beta fitted directly: `affine_start`), each once with the server's moving statistics and once "
    "re-estimating them on those examples; the best of the four (a compact lock's thief fits a full lock)",
    "e_from_scratch": "the yardstick of (e): the run's model as model_fn builds it (its initial weights, a "
    "random key), every weight trained on the same N public examples alone (fixed budget: "
    "Adam 1e-3, batch 32, max(300 steps, 30 epochs)); recovery minus this is what the shared "
    "weights give a thief beyond its own data",
}


STATISTICS_BATCHES = 100  # at momentum 0.9 the old statistics keep a weight of 0.9**100 ~ 3e-5


class Evaluator:
    """The run's model on the server's shared weights, into which a client's (or an attacker's)
    statistics, key and lock are put to measure its accuracy."""

    def __init__(self, config, server_state):
        self.config = config
        self.model = config.model_fn()()
        self.parts = client_work.ModelParts(self.model)  # the process's split: stable per model_fn
        shared_t, shared_n, self.key_vars, self.lock_vars = self.parts.split(self.model)
        for variable, value in zip(shared_t, server_state["trainable"]):
            variable.assign(value)
        self.statistics_vars = shared_n
        self.global_statistics = [np.asarray(v) for v in server_state["non_trainable"]]
        self.set_statistics(self.global_statistics)
        self._forward_training = tf.function(lambda x: self.model(x, training=True))

    def set_statistics(self, values):
        for variable, value in zip(self.statistics_vars, values):
            variable.assign(value)

    def set_secret(self, key, lock):
        for variable, value in zip(self.key_vars + self.lock_vars, [key] * len(self.key_vars) + list(lock)):
            variable.assign(value)

    def use_client(self, state):
        self.set_statistics(state["statistics"] or self.global_statistics)

    def use_own_secret(self, state):
        """The client's statistics (if it keeps them), key and lock."""
        self.use_client(state)
        self.set_secret(state["key"][0], state["lock"])

    def reestimate_statistics(self, images, labels, input_shape, seed, batch_size=64):
        """Moves the moving statistics to `images` by train-mode forward passes (no weight changes),
        cycling the examples for STATISTICS_BATCHES batches."""
        for x, _ in cycled_batches(images, labels, input_shape, batch_size, seed).take(STATISTICS_BATCHES):
            self._forward_training(x)

    def accuracy(self, dataset):
        return float(accuracy(self.model, dataset))


def cycled_batches(images, labels, input_shape, batch_size, seed):
    """Shuffled batches of a small labelled set, repeated without end."""
    return data_lib.make_dataset(
        images, labels, input_shape, min(batch_size, len(labels)), shuffle_seed=seed, repeat=None
    )


# The from-scratch yardstick's fixed budget (chosen before any run, never tuned on the evaluation examples).
SCRATCH_LEARNING_RATE = 1e-3
SCRATCH_BATCH_SIZE = 32
SCRATCH_MIN_STEPS = 300
SCRATCH_EPOCHS = 30


def scratch_steps(examples):
    """The from-scratch budget in steps for `examples` public examples: max(300 steps, 30 epochs)."""
    return max(SCRATCH_MIN_STEPS, -(-SCRATCH_EPOCHS * int(examples) // SCRATCH_BATCH_SIZE))


def train_from_scratch(config, images, labels, eval_ds, seed, steps=None):
    """Accuracy on `eval_ds` of the run's model (model_fn's initial weights; FedKL: a random key of
    the run's distribution and model_fn's lock) after training every weight on (`images`, `labels`)
    alone: Adam(SCRATCH_LEARNING_RATE), batches of SCRATCH_BATCH_SIZE in train mode, `steps`
    (default `scratch_steps`)."""
    model = config.model_fn()()
    if config.locked:
        for lock in private.lock_layers(model):
            lock.key.assign(config.random_key(seed=[seed, 3]))
    steps = scratch_steps(len(labels)) if steps is None else int(steps)
    optimizer = tf.keras.optimizers.Adam(SCRATCH_LEARNING_RATE)
    loss_fn = classification_loss()

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    shape = tuple(config.input_shape)
    for x, y in cycled_batches(images, labels, shape, SCRATCH_BATCH_SIZE, seed).take(steps):
        step(x, y)
    return float(accuracy(model, eval_ds))


def _evaluation_setup(root_dir, public_size, seed, dataset):
    """(config, dataset, process, public indices, evaluation data set) of a run."""
    config = run_dir.load_config(root_dir)
    dataset = dataset or data_lib.load(config.dataset, config.data_dir)
    process = build_process(config)
    public, held_out = data_lib.split_test(dataset, public_size, seed)
    eval_ds = data_lib.make_dataset(dataset.x_test[held_out], dataset.y_test[held_out], tuple(config.input_shape), 256)
    return config, dataset, process, public, held_out, eval_ds


def _restore(root_dir, config, process, round_num, max_clients):
    """(server state, client states, round, client ids, their last update rounds) of a run's round (None:
    the last complete one). Only the states of the `max_clients` clients that took part most recently
    (by id among equals: the others still hold initial locks) are read (FedKL; FedAvg: none)."""
    manager = run_dir.RunStateManager(root_dir)
    restored = manager.load(config, process, round_num, client_ids=())
    if restored is None:
        raise ProgramError(f"{root_dir} has no complete round to evaluate")
    server_state, _, round_num = restored
    if not config.locked:
        return server_state, {}, round_num, [], {}
    last_round = manager.clients.last_update_rounds(round_num)
    client_ids = sorted(sorted(last_round, key=int), key=lambda c: -last_round[c])[:max_clients]
    client_states = manager.load_clients(config, process, round_num, client_ids)
    return server_state, client_states, round_num, client_ids, {c: last_round[c] for c in client_ids}


def _own_secret_accuracy(evaluator, client_states, client_ids, eval_ds):
    """{client: accuracy with the global weights and its own key and lock} (entry (a))."""
    result = {}
    for cid in client_ids:
        evaluator.use_own_secret(client_states[cid])
        result[cid] = evaluator.accuracy(eval_ds)
    return result


def _reporter(progress):
    """print (flushed) with `progress`, else nothing."""
    return functools.partial(print, flush=True) if progress else lambda *_: None


def accuracy_by_round(root_dir, public_size=1000, max_clients=10, seed=0, dataset=None, progress=False):
    """{round: accuracy} for every complete round on disk (`--keep_rounds` decides which are kept):
    the global model (FedAvg) or the clients' mean of entry (a) (FedKL), on `evaluate`'s examples.
    With `progress`, prints a line per round."""
    report = _reporter(progress)
    config, dataset, process, _, _, eval_ds = _evaluation_setup(root_dir, public_size, seed, dataset)
    curve = {}
    for round_num in run_dir.complete_rounds(root_dir):
        report(f"accuracy by round: round {round_num}")
        server_state, client_states, _, client_ids, _ = _restore(root_dir, config, process, round_num, max_clients)
        evaluator = Evaluator(config, server_state)
        if config.locked:
            curve[round_num] = float(
                np.mean(list(_own_secret_accuracy(evaluator, client_states, client_ids, eval_ds).values()))
            )
        else:
            curve[round_num] = evaluator.accuracy(eval_ds)
    return curve


def evaluate(
    root_dir,
    round_num=None,
    public_sizes=(100, 1000),
    max_clients=10,
    recovery_steps=300,
    seed=0,
    dataset=None,
    progress=False,
    lock_recovery=None,
):
    """The accuracy matrix of a run's (last complete, or given) round, as a JSON-ready dict. With `progress`,
    prints a line per stage and client as it goes.

    `lock_recovery`: the attack of entry (e) (`attacks.lock_recovery.recover`'s arguments and result);
    None: no entry (e), nor its from-scratch yardstick.
    """
    report = _reporter(progress)
    # The first line comes once the run has been read: a run that cannot be evaluated gets its error line alone.
    config, dataset, process, public, held_out, eval_ds = _evaluation_setup(
        root_dir, max(public_sizes, default=0), seed, dataset
    )
    server_state, client_states, round_num, client_ids, last_update = _restore(
        root_dir, config, process, round_num, max_clients
    )
    report(f"evaluating {root_dir}: round {round_num} restored; {len(held_out)} evaluation examples")
    for size in sorted({int(s) for s in public_sizes if int(s) > len(public)}):
        report(
            f"warning: public size {size} exceeds half the test split: the lock-recovery attacker gets "
            f"{len(public)} examples"
        )
    result = dict(
        root_dir=root_dir,
        round=round_num,
        algorithm=config.algorithm,
        model=config.model,
        dataset=config.dataset,
        num_clients=config.num_clients,
        key_distribution=config.key_distribution,
        random_key_penalty=config.random_key_penalty,
        evaluation_examples=int(len(held_out)),
        public_examples=int(len(public)),
    )
    tf.keras.utils.set_random_seed(seed)
    evaluator = Evaluator(config, server_state)
    if not config.locked:
        result["global"] = evaluator.accuracy(eval_ds)
        return result

    result.update(evaluated_clients=client_ids, last_update_round=last_update, descriptions=ENTRIES)
    rows = _client_rows(evaluator, config, dataset, client_states, client_ids, eval_ds, seed, report)
    for name, values in rows.items():
        result[name] = dict(mean=float(np.mean(list(values.values()))), per_client=values)
    report("(d) the global model alone")
    evaluator.set_statistics(evaluator.global_statistics)
    random_key = config.random_key(seed=[seed, 2])
    evaluator.set_secret(random_key, [np.zeros(v.shape, np.float32) for v in evaluator.lock_vars])
    result["d_global_zero_lock"] = evaluator.accuracy(eval_ds)
    fresh_lock = [v.numpy() for v in process.parts.split(config.model_fn()())[3]]
    evaluator.set_secret(random_key, fresh_lock)
    result["d_global_fresh_lock_random_key"] = evaluator.accuracy(eval_ds)
    if lock_recovery is not None:
        recovery = (lock_recovery, evaluator, config, dataset, public, public_sizes, eval_ds, recovery_steps)
        result.update(_lock_recovery_entries(*recovery, seed, random_key, fresh_lock, report))
    return result


def _lock_recovery_entries(
    lock_recovery,
    evaluator,
    config,
    dataset,
    public,
    public_sizes,
    eval_ds,
    steps,
    seed,
    random_key,
    fresh_lock,
    report,
):
    """Entry (e) and its from-scratch yardstick (a compact lock's by `full_lock_thief`)."""
    if config.lock_kernel == "compact":
        evaluator, fresh_lock = full_lock_thief(evaluator, config)
    publics = [(str(int(size)), public[: min(int(size), len(public))]) for size in public_sizes]
    recovery = {}
    for size, usable in publics:
        found = lock_recovery(
            evaluator,
            dataset.x_test[usable],
            dataset.y_test[usable],
            eval_ds,
            steps=steps,
            seed=seed,
            random_key=random_key,
            fresh_lock=fresh_lock,
            report=report,
        )
        recovery[size] = dict(examples=int(len(usable)), steps=int(steps), **found)
    scratch = _from_scratch_entries(config, dataset, publics, recovery, eval_ds, seed, report)
    return {"e_lock_recovery": recovery, "e_from_scratch": scratch}


def full_lock_thief(evaluator, config):
    """(an Evaluator of the same model with full lock kernels on `evaluator`'s shared weights and statistics, its
    fresh lock): a thief of a compact-lock run fits whatever lock it likes, and the compact form's few variables
    would understate it."""
    full = dataclasses.replace(config, lock_kernel="full", lock_noise=0.0)
    shared = dict(
        trainable=[v.numpy() for v in evaluator.parts.split(evaluator.model)[0]],
        non_trainable=evaluator.global_statistics,
    )
    thief = Evaluator(full, shared)
    return thief, [v.numpy() for v in thief.lock_vars]


def _client_rows(evaluator, config, dataset, client_states, client_ids, eval_ds, seed, report):
    """Entries (a), (b), (c) and (f): {entry: {client: accuracy}}."""
    report(f"(a) own key and lock: clients {', '.join(client_ids)}")
    rows = {"a_own_key_and_lock": _own_secret_accuracy(evaluator, client_states, client_ids, eval_ds)}
    rows.update({name: {} for name in ("b_own_lock_random_key", "c_own_lock_other_key", "c_other_key_and_lock")})
    for index, cid in enumerate(client_ids):
        report(f"(b, c) random and other clients' secrets: client {cid}")
        state = client_states[cid]
        other = client_states[client_ids[(index + 1) % len(client_ids)]]
        random_key = config.random_key(seed=[seed, 1, int(cid)])
        evaluator.use_client(state)
        for name, key, lock in (
            ("b_own_lock_random_key", random_key, state["lock"]),
            ("c_own_lock_other_key", other["key"][0], state["lock"]),
            ("c_other_key_and_lock", other["key"][0], other["lock"]),
        ):
            evaluator.set_secret(key, lock)
            rows[name][cid] = evaluator.accuracy(eval_ds)
    rows["f_own_secret_own_statistics"] = {}
    partition = client_partition(config, dataset)
    for cid in client_ids:
        report(f"(f) own secret, statistics re-estimated on its data: client {cid}")
        evaluator.use_own_secret(client_states[cid])
        own = partition[int(cid)]
        evaluator.reestimate_statistics(dataset.x_train[own], dataset.y_train[own], tuple(config.input_shape), seed)
        rows["f_own_secret_own_statistics"][cid] = evaluator.accuracy(eval_ds)
    return rows


def _from_scratch_entries(config, dataset, publics, recovery, eval_ds, seed, report):
    """Entry (e)'s yardstick on each public set of `publics` ((size, indices) pairs), next to `recovery`'s."""
    scratch = {}
    for size, usable in publics:
        report(f"(e) from scratch on the {len(usable)} public examples alone")
        value = train_from_scratch(config, dataset.x_test[usable], dataset.y_test[usable], eval_ds, seed)
        scratch[size] = dict(
            examples=int(len(usable)),
            steps=scratch_steps(len(usable)),
            accuracy=value,
            recovery_minus_scratch=recovery[size]["accuracy"] - value,
        )
    return scratch


def format_matrix(result):
    """A readable table of an evaluation result."""
    lines = [
        f"{result['algorithm']} {result['model']} {result['dataset']}, round {result['round']}, "
        f"{result['evaluation_examples']} evaluation examples"
    ]
    if "global" in result:
        return "\n".join(lines + [f"  global model: {result['global']:.4f}"])
    for name in (
        "a_own_key_and_lock",
        "b_own_lock_random_key",
        "c_own_lock_other_key",
        "c_other_key_and_lock",
        "f_own_secret_own_statistics",
    ):
        per_client = " ".join(f"{v:.3f}" for v in result[name]["per_client"].values())
        lines.append(f"  {name:32s} mean {result[name]['mean']:.4f}  [{per_client}]")
    for name in ("d_global_zero_lock", "d_global_fresh_lock_random_key"):
        lines.append(f"  {name:32s} {result[name]:.4f}")
    for size, entry in result.get("e_lock_recovery", {}).items():
        by_statistics = ", ".join(f"{k} statistics {v:.4f}" for k, v in entry["by_statistics"].items())
        if "affine_by_statistics" in entry:
            by_statistics += "; gamma/beta fitted directly: " + ", ".join(
                f"{k} statistics {v:.4f}" for k, v in entry["affine_by_statistics"].items()
            )
        lines.append(
            f"  {'e_lock_recovery_' + size:32s} {entry['accuracy']:.4f}  ({entry['examples']} examples, "
            f"{entry['steps']} steps; {by_statistics})"
        )
    for size, entry in result.get("e_from_scratch", {}).items():
        lines.append(
            f"  {'e_from_scratch_' + size:32s} {entry['accuracy']:.4f}  ({entry['steps']} steps; recovery minus "
            f"from scratch {100 * entry['recovery_minus_scratch']:+.1f} pp)"
        )
    return "\n".join(lines)
