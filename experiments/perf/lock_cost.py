"""Cost of a spatial lock, full and compact kernels, against the FedAvg control: train step and private bytes.

  python -m experiments.perf.lock_cost --repeats=40 --resnet_repeats=20

Per model (LeNet, ResNet-20; digits at 32x32, batch 32) four variants take the clients' train step
(TorchSGD: momentum 0.9, Nesterov, weight decay 5e-4): the control ('fedavg-norm': the lock block
replaced by the same normalisation with a learned affine), the spatial lock with full kernels
(kernel='full'), the same lock held compact (kernel='compact') and that with the lock noise of
experiments.studies.rounds (round_noise=0.5, its per-entry scale and shift in every step). Each repeat times a block of
steps of each variant in turn (A B C A B C ...); a repeat's ratio is the variant's time over the
control's in that repeat, reported as the median and quartiles of those ratios (and the ratio of the
variants' fastest blocks), by the wall clock and by this process's CPU time (less sensitive to other
processes on a shared machine). Private bytes: a
client's key and lock weights, and its whole stored state (with the momentum buffers it keeps).
"""

import argparse
import json
import os
import subprocess
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS = ("lenet", "resnet20")
VARIANTS = {  # models.build options of each variant
    "control": dict(lock=False, control=True),
    "full": dict(lock=True, affine="spatial", kernel="full"),
    "compact": dict(lock=True, affine="spatial", kernel="compact"),
    "compact-noise": dict(lock=True, affine="spatial", kernel="compact", round_noise=0.5),
}
INPUT_SHAPE = (32, 32, 1)
TARGET_RATIO = 1.15
TARGET_PRIVATE_BYTES = 2**20


def git_commit():
    """HEAD's commit, with '+dirty' when tracked files are modified."""
    try:
        run = lambda *args: subprocess.run(  # noqa: E731
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        return run("rev-parse", "HEAD") + ("+dirty" if run("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def train_step(model, images, labels):
    """The clients' train step of `model` as a tf.function (TorchSGD, PyTorch's defaults of the paper)."""
    import tensorflow as tf

    from tfkl import optimizers, training

    optimizer = optimizers.TorchSGD(0.01, 0.9, True, 5e-4)
    variables = model.trainable_variables
    state = optimizer.initialize([tf.TensorSpec(v.shape, v.dtype) for v in variables])
    state["momentum_buffers"] = [tf.Variable(b, trainable=False) for b in state["momentum_buffers"]]  # kept
    loss_fn = training.classification_loss()

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(images, training=True))
        new_state, new = optimizer.next(state, [v.read_value() for v in variables], tape.gradient(loss, variables))
        for variable, value in zip(variables, new):
            variable.assign(value)
        for buffer, value in zip(state["momentum_buffers"], new_state["momentum_buffers"]):
            buffer.assign(value)
        return loss

    return step


def private_bytes(model):
    """(key and lock weights, the client's stored state) in bytes: what a client keeps of its own."""
    from tfkl import keys, private
    from tfkl.federated import client_work

    locks = private.lock_layers(model)
    secret = sum(v.numpy().nbytes for lock in locks for v in lock.private_weights)
    key = keys.generate_key(locks[0].key_dim) if locks else None
    state = client_work.initial_client_state(model, key, persist_optimizer_state=True, keep_statistics=False)
    stored = sum(np.asarray(a).nbytes for part in state.values() for a in part)
    return secret, stored


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # cpu: this process's threads only


def interleaved(steps, repeats, steps_per_block, warmup):
    """{clock: {variant: seconds per step of each repeat}}, the variants timed in turn within each repeat."""
    for step in steps.values():
        for _ in range(warmup):
            step().numpy()
    times = {clock: {name: [] for name in steps} for clock in CLOCKS}
    for _ in range(repeats):
        for name, step in steps.items():
            start = {clock: read() for clock, read in CLOCKS.items()}
            for _ in range(steps_per_block):
                out = step()
            out.numpy()
            for clock, read in CLOCKS.items():
                times[clock][name].append((read() - start[clock]) / steps_per_block)
    return times


def quartiles(values):
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3), "n": len(values)}


def summary(times):
    """Per-step seconds, paired ratios to the control and the ratio of the fastest blocks, of one clock."""
    control = np.asarray(times["control"])
    variants = [v for v in VARIANTS if v != "control"]
    return {
        "seconds_per_step": {v: quartiles(t) for v, t in times.items()},
        "ratio_to_control": {v: quartiles(np.asarray(times[v]) / control) for v in variants},
        "ratio_of_fastest_blocks": {v: float(np.min(times[v]) / control.min()) for v in variants},
    }


def measure(name, args):
    """Timings (wall and CPU clocks), ratios to the control and private bytes of the variants of model `name`."""
    from tfkl import data, models

    digits = data.load("digits")
    images = data.preprocess(digits.x_train[: args.batch_size], INPUT_SHAPE)
    labels = digits.y_train[: args.batch_size].astype(np.int64)
    built = {v: models.build(name, INPUT_SHAPE, 10, seed=0, **options) for v, options in VARIANTS.items()}
    steps = {v: train_step(model, images, labels) for v, model in built.items()}
    block, repeats = (args.lenet_steps, args.repeats) if name == "lenet" else (args.resnet_steps, args.resnet_repeats)
    times = interleaved(steps, repeats, block, args.warmup)
    return {
        "steps_per_block": block,
        "repeats": repeats,
        "clocks": {clock: summary(t) for clock, t in times.items()},
        "private_bytes": {v: dict(zip(("key_and_lock", "client_state"), private_bytes(m))) for v, m in built.items()},
    }


def table(results):
    lines = [
        "| model | variant | wall ms/step | / control, wall (median, IQR) | / control, CPU (median, IQR) "
        "| key + lock (bytes) | client state (bytes) |",
        "|---|---|---:|---|---|---:|---:|",
    ]
    for name, result in results.items():
        for variant in VARIANTS:
            seconds = result["clocks"]["wall"]["seconds_per_step"][variant]["median"]
            ratios = [result["clocks"][clock]["ratio_to_control"].get(variant) for clock in CLOCKS]
            shown = ["1" if r is None else f"{r['median']:.2f}x ({r['q1']:.2f}-{r['q3']:.2f})" for r in ratios]
            size = result["private_bytes"][variant]
            lines.append(
                f"| {name} | {variant} | {1e3 * seconds:.1f} | {' | '.join(shown)} | {size['key_and_lock']:,} | "
                f"{size['client_state']:,} |"
            )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: lenet, resnet20")
    parser.add_argument("--repeats", type=int, default=40, help="timed LeNet blocks per variant")
    parser.add_argument("--resnet_repeats", type=int, default=20, help="timed ResNet-20 blocks per variant")
    parser.add_argument("--lenet_steps", type=int, default=10, help="train steps per LeNet block")
    parser.add_argument("--resnet_steps", type=int, default=3, help="train steps per ResNet-20 block")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--output", default=os.path.join(REPO_ROOT, "results", "lock_cost.json"))
    args = parser.parse_args()
    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(MODELS))
    if unknown or min(args.repeats, args.resnet_repeats, args.batch_size) < 1:
        parser.error(f"models must be among {MODELS} (got {unknown}); repeats and batch_size positive")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tfkl  # noqa: F401  (tf.keras is Keras 2 from here)

    started = time.time()
    results = {name: measure(name, args) for name in names}
    payload = {
        "git_commit": git_commit(),
        "settings": {k: v for k, v in vars(args).items() if k != "output"} | {"input_shape": list(INPUT_SHAPE)},
        "targets": {"ratio_to_control": TARGET_RATIO, "compact_lenet_private_bytes": TARGET_PRIVATE_BYTES},
        "note": "timed on a shared 2-core machine under load (other processes): ratios within one interleaved run only",
        "minutes": (time.time() - started) / 60,
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
    print(table(results))
    print(f"written: {args.output} ({payload['minutes']:.1f} min, commit {payload['git_commit']})")


if __name__ == "__main__":
    main()
