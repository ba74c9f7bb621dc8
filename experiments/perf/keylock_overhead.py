"""Cost of the key-lock block: training step and forward pass with vs without it, same backbone.

The plain and the locked model are the same zoo backbone (`tfkl.models.build(lock=False/True)`):
for LeNet the lock adds a normalisation + key-driven affine after conv1; for ResNet-20 it takes the
place of the stem's BatchNormalization. LeNet is also timed with a Keras BatchNormalization after
conv1 and no key: locked vs that model is the cost of the key, that model vs plain the cost of the
lock's architecture. All variants are timed in one process, interleaved in random order, and each
repeat gives a paired ratio variant/baseline; we report the ratios' median and quartiles (the machine
is shared, so absolute times drift; paired ratios cancel most of it).
"""

import numpy as np
import tensorflow as tf

from experiments import common
from tfkl import models, training

ARCHITECTURES = ("lenet", "resnet20")
INPUT_SHAPE = (32, 32, 3)
BATCH_SIZE = 64
NUM_CLASSES = 10
TARGET_OVERHEAD = 0.05


def _settings(quick):
    return {
        "architectures": list(ARCHITECTURES),
        "input_shape": list(INPUT_SHAPE),
        "batch_size": BATCH_SIZE,
        "num_classes": NUM_CLASSES,
        "optimizer": "tfkl TorchSGD (lr 0.01, momentum 0.9, Nesterov, wd 5e-4)",
        "steps_per_block": {"lenet": 2 if quick else 20, "resnet20": 2 if quick else 5},
        "repeats": {"lenet": 3 if quick else 30, "resnet20": 3 if quick else 15},
        "warmup_steps": 2 if quick else 5,
        "key_dim": 1024,
        "init": "pytorch",
    }


# Variant name -> models.build options; "locked_no_norm" (the key's affine alone, without the
# lock's normalisation) splits the lock's cost into its two parts.
VARIANTS = {
    "plain": dict(lock=False),
    "locked": dict(lock=True),
    "locked_no_norm": dict(lock=True, normalization="none"),
}
# Backbones without a normalisation of their own get "plain_batch_norm": the plain model with a Keras
# BatchNormalization (affine, fused) after conv1, i.e. the lock's architecture without the key.
BATCH_NORM_ARCHITECTURES = ("lenet",)
# (variant, baseline) pairs whose time ratio is reported; the first kind is the target.
COMPARISONS = [(name, "plain") for name in VARIANTS if name != "plain"] + [
    ("locked", "plain_batch_norm"),
    ("plain_batch_norm", "plain"),
]


def _with_batch_norm(model):
    """`model`, a chain of layers, with a BatchNormalization (PyTorch's defaults) after its conv1."""
    x = inputs = tf.keras.Input(model.input_shape[1:])
    for layer in model.layers[1:]:
        x = layer(x)
        if layer.name == "conv1":
            x = tf.keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name="conv1_bn")(x)
    return tf.keras.Model(inputs, x, name=f"{model.name}_batch_norm")


def _op_count(function, *args):
    """Operations in the traced graph of a tf.function (per-op dispatch dominates small models)."""
    return len(function.get_concrete_function(*args).graph.get_operations())


def measure(architecture, settings, seed=0):
    """Train-step and forward timings of each variant of `architecture`; the COMPARISONS' ratios."""
    rng = np.random.default_rng(seed)
    images = tf.constant(rng.random((BATCH_SIZE,) + INPUT_SHAPE, dtype=np.float32))
    labels = tf.constant(rng.integers(0, NUM_CLASSES, BATCH_SIZE))
    train_steps, forward_steps, params, graph_ops = {}, {}, {}, {}
    variants = {
        name: models.build(
            architecture,
            INPUT_SHAPE,
            NUM_CLASSES,
            init=settings["init"],
            seed=seed,
            key_dim=settings["key_dim"],
            **options,
        )
        for name, options in VARIANTS.items()
    }
    if architecture in BATCH_NORM_ARCHITECTURES:
        variants["plain_batch_norm"] = _with_batch_norm(
            models.build(architecture, INPUT_SHAPE, NUM_CLASSES, lock=False, init=settings["init"], seed=seed)
        )
    for name, model in variants.items():
        trainer = training.Trainer(model)
        forward = tf.function(lambda x, m=model: m(x, training=False))
        train_steps[name] = lambda t=trainer: t.train_step(images, labels)
        forward_steps[name] = lambda f=forward: f(images)
        params[name] = int(sum(np.prod(v.shape) for v in model.trainable_variables))
        graph_ops[name] = {
            "train_step": _op_count(trainer.train_step, images, labels),
            "forward": _op_count(forward, images),
        }
    result = {"trainable_parameters": params, "graph_ops": graph_ops}
    for phase, steps in (("train_step", train_steps), ("forward", forward_steps)):
        times = common.interleaved_timings(
            steps,
            settings["repeats"][architecture],
            settings["steps_per_block"][architecture],
            settings["warmup_steps"],
            rng,
        )
        pairs = [(name, base) for name, base in COMPARISONS if name in times and base in times]
        result[phase] = {
            "seconds": {name: common.summarize(t) for name, t in times.items()},
            "ratios": {
                f"{name}/{base}": common.summarize(np.asarray(times[name]) / times[base]) for name, base in pairs
            },
            "ratio_of_minima": {
                f"{name}/{base}": float(np.min(times[name]) / np.min(times[base])) for name, base in pairs
            },
        }
    return result


def run(quick):
    settings = _settings(quick)
    tf.keras.utils.set_random_seed(0)
    return payload(settings, {arch: measure(arch, settings) for arch in ARCHITECTURES})


def _rows_and_headline(results):
    """The overhead table's rows and the headline items of every architecture's measurements."""
    rows, headline = [], []
    for arch, r in results.items():
        for phase in ("train_step", "forward"):
            seconds = r[phase]["seconds"]
            for pair, ratio in r[phase]["ratios"].items():
                name, base = pair.split("/")
                rows.append(
                    [
                        arch,
                        phase,
                        name,
                        base,
                        1e3 * seconds[base]["median"],
                        1e3 * seconds[name]["median"],
                        ratio["median"],
                        f"{ratio['q1']:.3f}-{ratio['q3']:.3f}",
                        100 * (ratio["median"] - 1),
                        r[phase]["ratio_of_minima"][pair],
                        ratio["n"],
                    ]
                )
        overhead = r["train_step"]["ratios"]["locked/plain"]["median"] - 1
        headline.append(
            {
                "metric": f"{arch} train-step overhead of the lock",
                "value": 100 * overhead,
                "unit": "%",
                "target": f"<= {100 * TARGET_OVERHEAD:.0f} %",
                "met": bool(overhead <= TARGET_OVERHEAD),
            }
        )
        if "locked/plain_batch_norm" in r["train_step"]["ratios"]:
            key_cost = r["train_step"]["ratios"]["locked/plain_batch_norm"]["median"] - 1
            headline.append(
                {
                    "metric": f"{arch} train-step overhead of the key (locked vs {arch} + BatchNormalization)",
                    "value": 100 * key_cost,
                    "unit": "%",
                }
            )
    return rows, headline


def payload(settings, results):
    """The benchmark's payload from the measurements of each architecture."""
    rows, headline = _rows_and_headline(results)
    table = {
        "title": f"Key-lock overhead, batch {BATCH_SIZE}, {INPUT_SHAPE[0]}x{INPUT_SHAPE[1]}x{INPUT_SHAPE[2]}",
        "columns": [
            "model",
            "phase",
            "variant",
            "baseline",
            "baseline ms (median)",
            "variant ms (median)",
            "ratio to baseline (median)",
            "ratio IQR",
            "overhead %",
            "ratio of fastest blocks",
            "repeats",
        ],
        "rows": rows,
    }
    names = list(VARIANTS) + ["plain_batch_norm"]
    params = [
        [arch, quantity]
        + [("-" if name not in r[key] else r[key][name] if phase is None else r[key][name][phase]) for name in names]
        for arch, r in results.items()
        for quantity, key, phase in (
            ("trainable parameters", "trainable_parameters", None),
            ("graph ops, train step", "graph_ops", "train_step"),
            ("graph ops, forward", "graph_ops", "forward"),
        )
    ]
    notes = [
        common.SHARED_MACHINE_NOTE,
        "Ratio = paired variant/baseline time per repeat (all variants timed back to back in random order); "
        "'ratio of fastest blocks' = the variant's fastest block over the baseline's fastest block, the "
        "figure least disturbed by other jobs.",
        "locked = the paper's lock block (normalisation without affine + gamma/beta = relu(Dense(key)));"
        " locked_no_norm = the same lock without its normalisation (the key-driven affine alone).",
        "LeNet's plain backbone has no normalisation, so its lock adds a batch normalisation as well as the "
        "key's 1024 x 24 matrix-vector product; ResNet-20's lock replaces the stem's BatchNormalization. "
        "plain_batch_norm = LeNet + a Keras BatchNormalization after conv1 (no key): locked vs "
        "plain_batch_norm is the key's cost, plain_batch_norm vs plain the architecture's.",
        "The lock's batch normalisation runs as FusedBatchNormV3 (training: scale = gamma(key), offset = "
        "beta(key), moving statistics updated by the kernel); no variant uses XLA.",
    ]
    return {
        "settings": settings,
        "results": results,
        "headline": headline,
        "notes": notes,
        "tables": [table, {"title": "Size of each variant", "columns": ["model", "quantity"] + names, "rows": params}],
    }
