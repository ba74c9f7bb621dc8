"""Centralised baseline: train a zoo model with or without the lock, report test accuracy.

  python -m tff_programs.train_central --model=lenet --dataset=fashion_mnist --lock=true --epochs=5

With the lock it also reports the accuracy under random keys (same weights, fresh CSPRNG keys).
"""

import json
import os

from absl import flags

from tff_programs import common, launch
from tfkl import names

_MODEL = flags.DEFINE_enum("model", "lenet", names.MODELS, "Zoo model.")
_DATASET = flags.DEFINE_enum("dataset", "digits", names.DATASETS, "Data set.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where the data set's files are.")
_LOCK = flags.DEFINE_bool("lock", True, "Add the key-lock block after the first conv layer.")
_EPOCHS = flags.DEFINE_integer("epochs", 5, "Training epochs.", lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Batch size.", lower_bound=1)
_MAX_TRAIN = flags.DEFINE_integer("max_train_examples", None, "Train on the first N examples only.", lower_bound=1)
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 0.01, "SGD learning rate.", lower_bound=0.0)
_INIT = flags.DEFINE_enum("init", "pytorch", names.INITS, "Weight initialisation scheme.")
_KEY_DIM = flags.DEFINE_integer("key_dim", 1024, "Key length.", lower_bound=1)
_NORMALIZATION = flags.DEFINE_enum("normalization", "batch", names.NORMALIZATIONS, "Lock normalisation.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for weights, data order and (this experiment's) keys.")
_RANDOM_KEYS = flags.DEFINE_integer("random_keys", 5, "Random keys to evaluate the trained lock with.", lower_bound=1)
_PUBLIC_SIZE = flags.DEFINE_integer(
    "public_size",
    0,
    "Measure accuracy on the test split minus the public cut of "
    "this size that tff_programs.evaluate holds out (same --eval_seed), so the "
    "figures compare with federated runs; 0: the whole test split.",
    lower_bound=0,
)
_EVAL_SEED = flags.DEFINE_integer("eval_seed", 0, "Seed of the public/evaluation cut (as tff_programs.evaluate).")
_OUT = flags.DEFINE_string("out", None, "Optional JSON file for the results.")

flags.register_validator("learning_rate", lambda v: v > 0, "--learning_rate must be positive")


def main(argv):
    import numpy as np
    import tensorflow as tf

    import tfkl
    from tfkl import data, models, training

    del argv  # launch.parse_flags refused positional arguments
    tf.keras.utils.set_random_seed(_SEED.value)
    dataset = common.load_dataset(_DATASET.value, _DATA_DIR.value)
    input_shape = models.input_shape(_MODEL.value, dataset)
    model = models.build(
        _MODEL.value,
        input_shape,
        dataset.num_classes,
        lock=_LOCK.value,
        init=_INIT.value,
        seed=_SEED.value,
        key_dim=_KEY_DIM.value,
        normalization=_NORMALIZATION.value,
        key=tfkl.generate_key(_KEY_DIM.value, seed=_SEED.value) if _LOCK.value else None,
    )
    x_train, y_train = dataset.x_train[: _MAX_TRAIN.value], dataset.y_train[: _MAX_TRAIN.value]
    train = data.make_dataset(x_train, y_train, input_shape, _BATCH_SIZE.value, shuffle_seed=_SEED.value)
    _, evaluation = data.split_test(dataset, _PUBLIC_SIZE.value, _EVAL_SEED.value)
    test = data.make_dataset(dataset.x_test[evaluation], dataset.y_test[evaluation], input_shape, 256)
    trainer = training.Trainer(model, tfkl.optimizers.TorchSGD(_LEARNING_RATE.value))
    steps = int(np.ceil(len(x_train) / _BATCH_SIZE.value))
    by_epoch = {}
    for epoch in range(1, _EPOCHS.value + 1):
        print(f"epoch {epoch}/{_EPOCHS.value}")
        trainer.fit_epoch(train, tf.keras.utils.Progbar(steps))
        by_epoch[epoch] = training.accuracy(model, test)
        print(f"test accuracy {by_epoch[epoch]:.4f}")
    results = {
        "model": _MODEL.value,
        "dataset": _DATASET.value,
        "lock": _LOCK.value,
        "epochs": _EPOCHS.value,
        "train_examples": len(x_train),
        "seed": _SEED.value,
        "evaluation_examples": len(evaluation),
        "public_size": _PUBLIC_SIZE.value,
        "eval_seed": _EVAL_SEED.value,
        "test_accuracy": by_epoch[_EPOCHS.value],
        "accuracy_by_epoch": by_epoch,
    }
    if _LOCK.value:
        random_key_accuracies = []
        for _ in range(_RANDOM_KEYS.value):
            tfkl.set_key(model, tfkl.generate_key(_KEY_DIM.value))
            random_key_accuracies.append(training.accuracy(model, test))
        results["test_accuracy_random_keys"] = random_key_accuracies
        results["test_accuracy_random_key_mean"] = float(np.mean(random_key_accuracies))
    print(json.dumps(results, indent=2))
    if _OUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
        with open(_OUT.value, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    launch.run(main)
