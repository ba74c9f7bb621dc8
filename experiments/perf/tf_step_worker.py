"""tf.keras training-step timer for experiments/perf/torch_compare.py (same JSON-line protocol as
experiments/perf/torch_side/step_worker.py): our locked zoo model + `tfkl.training.Trainer` (TorchSGD).

  python -m experiments.perf.tf_step_worker --intra_op_threads=1 --inter_op_threads=1
"""

import json
import sys

from absl import app, flags
import numpy as np
import tensorflow as tf

from tfkl import models, training

_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Batch size.", lower_bound=1)
_INTRA = flags.DEFINE_integer(
    "intra_op_threads", 0, "tf.config.threading intra-op threads (0: TF's default).", lower_bound=0
)
_INTER = flags.DEFINE_integer(
    "inter_op_threads", 0, "tf.config.threading inter-op threads (0: TF's default).", lower_bound=0
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights and the random batch.")

INPUT_SHAPE = (32, 32, 3)
NUM_CLASSES = 10


class Job:
    """One locked zoo model with the paper's optimizer and a fixed random batch."""

    def __init__(self, name, batch_size, seed):
        rng = np.random.default_rng(seed)
        self.model = models.build(name, INPUT_SHAPE, NUM_CLASSES, lock=True, seed=seed)
        self.trainer = training.Trainer(self.model)
        self.images = tf.constant(rng.random((batch_size,) + INPUT_SHAPE, dtype=np.float32))
        self.labels = tf.constant(rng.integers(0, NUM_CLASSES, batch_size))

    def time(self, steps):
        start = tf.timestamp()
        for _ in range(steps):
            loss = self.trainer.train_step(self.images, self.labels)
        loss.numpy()
        return float(tf.timestamp() - start) / steps


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    tf.config.threading.set_intra_op_parallelism_threads(_INTRA.value)
    tf.config.threading.set_inter_op_parallelism_threads(_INTER.value)
    tf.keras.utils.set_random_seed(_SEED.value)
    jobs = {}
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "quit":
            break
        name = command["model"]
        if command["cmd"] == "setup":
            jobs[name] = Job(name, _BATCH_SIZE.value, _SEED.value)
            answer = {
                "model": name,
                "parameters": int(sum(np.prod(v.shape) for v in jobs[name].model.trainable_variables)),
                "threads": _INTRA.value,
                "interop_threads": _INTER.value,
                "tensorflow": tf.__version__,
            }
        elif command["cmd"] == "time":
            answer = {"model": name, "seconds_per_step": jobs[name].time(int(command["steps"]))}
        else:
            answer = {"error": f"unknown command {command['cmd']!r}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    app.run(main)
