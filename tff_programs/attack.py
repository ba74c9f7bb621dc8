"""Gradient-inversion attacks on client gradients/updates, with and without the key-lock.

  python -m tff_programs.attack --attack=idlg --threat=none,oracle,fixed-key,adaptive \\
      --model=lenet --dataset=fashion_mnist --num_images=10 --batch_size=1 --out_dir=runs/attack

Simulated victims (default): the same backbone without the lock (threat 'none') and with it (the
other threats); each client group of --batch_size images gives one single-step gradient
(--target=gradient) or one multi-step FedAvg update of local SGD (--target=update). With
--capture=FILE the binary attacks a captured update from the federated trainer instead (threats
'none' for an unlocked capture, 'fixed-key'/'adaptive' for a locked one; no ground truth, so only
reconstructions and labels are written).

Writes grid.png (truth above one row of reconstructions per threat), metrics.json (per image,
summary mean/std, timing, settings) and table.txt, and prints progress and the table.
"""

import json
import os
import time

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf  # imported before flag parsing, as Keras layers misbehave otherwise

from tff_programs import common

THREATS = ("none", "fixed-key", "adaptive", "oracle")
ATTACKS = ("dlg", "idlg", "ig", "grnn")

_ATTACK = flags.DEFINE_enum("attack", "idlg", ATTACKS, "Attack.")
_THREAT = flags.DEFINE_list("threat", ["none", "oracle", "fixed-key", "adaptive"],
                            f"Threat models, comma-separated, from {THREATS}.")
_MODEL = flags.DEFINE_enum("model", "lenet", common.MODELS, "Victim model.")
_DATASET = flags.DEFINE_enum("dataset", "fashion_mnist", common.DATASETS, "Data set of the victim images.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where the data set's files are.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 4, "Images to attack (training images from --offset).", lower_bound=1)
_OFFSET = flags.DEFINE_integer("offset", 0, "Index of the first attacked training image.", lower_bound=0)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 1, "Images per client gradient/update.", lower_bound=1)
_TARGET = flags.DEFINE_enum("target", "gradient", ("gradient", "update"),
                            "Single-step gradient, or a multi-step FedAvg update simulated locally.")
_LOCAL_BATCH_SIZE = flags.DEFINE_integer("local_batch_size", 1, "Client batch size (--target=update).",
                                         lower_bound=1)
_LOCAL_EPOCHS = flags.DEFINE_integer("local_epochs", 1, "Client epochs (--target=update).", lower_bound=1)
_CLIENT_LR = flags.DEFINE_float("client_learning_rate", 0.01, "Client SGD learning rate (--target=update).")
_CAPTURE = flags.DEFINE_string("capture", None, "Attack this capture file (tfkl.capture format) instead.")
_INIT = flags.DEFINE_enum("init", "pytorch", common.INITS, "Victim weight initialisation.")
_NORMALIZATION = flags.DEFINE_enum("normalization", "batch", common.NORMALIZATIONS, "Victim lock normalisation.")
_TRAIN_EPOCHS = flags.DEFINE_integer("train_epochs", 0, "Train each victim centrally for this many epochs first.",
                                     lower_bound=0)
_TRAIN_EXAMPLES = flags.DEFINE_integer("train_examples", 5000, "Training images for --train_epochs.", lower_bound=1)
_ITERATIONS = flags.DEFINE_integer("iterations", None, "Attack iterations (default: the attack's).", lower_bound=1)
_RESTARTS = flags.DEFINE_integer("restarts", None, "Restarts per image (default: the attack's).", lower_bound=1)
_LEARNING_RATE = flags.DEFINE_float("learning_rate", None, "Attack step size (ig, grnn).")
_TV = flags.DEFINE_float("tv", None, "Total-variation weight (default: the attack's).")
_DISTANCE = flags.DEFINE_enum("distance", None, ("l2", "cosine", "grnn"), "Gradient distance (default: the attack's).")
_LABELS = flags.DEFINE_enum("labels", None, ("infer", "joint"), "Label handling (default: the attack's).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the victims' weights and the attacks' starts.")
_OUT_DIR = flags.DEFINE_string("out_dir", "runs/attack", "Output directory.")

flags.register_validator("threat", lambda v: bool(v) and all(t in THREATS for t in v),
                         f"--threat takes a comma-separated list from {THREATS}")
flags.register_validator("client_learning_rate", lambda v: v > 0, "--client_learning_rate must be positive")
flags.register_validator("learning_rate", lambda v: v is None or v > 0, "--learning_rate must be positive")
flags.register_validator("tv", lambda v: v is None or v >= 0, "--tv must be non-negative")


def attack_options(attack, iterations=None, restarts=None, learning_rate=None, tv=None, distance=None,
                   labels=None):
    """The attack's keyword options from the optional flag values."""
    options = {}
    if iterations:
        options["iterations"] = iterations
    if restarts:
        options["restarts"] = restarts
    if learning_rate is not None:
        if attack in ("dlg", "idlg"):
            raise ValueError("--learning_rate applies to ig and grnn (L-BFGS has none)")
        options["learning_rate"] = learning_rate
    if tv is not None:
        options["tv"] = tv
    if distance:
        options["distance"] = distance
    if labels:
        options["label_mode"] = labels
    return options


def load_images(dataset_name, model_name, num_images, offset=0, data_dir=None):
    """(dataset, input_shape, images [N, H, W, C] in [0, 1], labels [N]) from the training split."""
    from tfkl import data
    dataset = common.load_dataset(dataset_name, data_dir)
    input_shape = tuple(int(s) for s in common.input_shape(model_name, dataset))
    if offset + num_images > len(dataset.x_train):
        common.fail(f"--offset + --num_images exceeds the {len(dataset.x_train)} training images")
    images = data.preprocess(dataset.x_train[offset:offset + num_images], input_shape).numpy()
    return dataset, input_shape, images, dataset.y_train[offset:offset + num_images]


def train_victims(victims, dataset, input_shape, epochs, examples, seed, log=print):
    """Trains each victim (its own copy) centrally for `epochs` on the first `examples` images."""
    from tfkl import data, optimizers, training
    for name, model in victims.items():
        train = data.make_dataset(dataset.x_train[:examples], dataset.y_train[:examples], input_shape, 64,
                                  shuffle_seed=seed)
        trainer = training.Trainer(model, optimizers.TorchSGD(0.01))
        for epoch in range(epochs):
            loss = trainer.fit_epoch(train)
            log(f"trained victim {name}: epoch {epoch + 1}/{epochs} loss {loss:.4f}")


def run(attack, threats, model, dataset, num_images, batch_size=1, offset=0, target="gradient", init="pytorch",
        normalization="batch", train_epochs=0, train_examples=5000, options=None, update_options=None, seed=0,
        out_dir=None, data_dir=None, log=print):
    """Attacks `num_images` images under each threat; returns the JSON-ready results (and writes
    grid.png, metrics.json, table.txt into `out_dir` if given)."""
    from attacks import experiment
    data_set, input_shape, images, labels = load_images(dataset, model, num_images, offset, data_dir)
    victims = experiment.build_victims(model, input_shape, data_set.num_classes, init, seed, normalization,
                                       threats=threats)
    if train_epochs:
        train_victims(victims, data_set, input_shape, train_epochs, train_examples, seed, log)

    def progress(threat, done, total, losses):
        log(f"[{attack}/{threat}] {done}/{total} iterations, best losses "
            f"median {np.median(losses):.3g} min {np.min(losses):.3g}")

    start = time.perf_counter()
    results = experiment.run_threats(
        attack, victims, images, labels, threats, batch_size, options, target,
        capture_dir=out_dir and os.path.join(out_dir, "captures"), update_options=update_options, seed=seed,
        progress=progress)
    settings = dict(attack=attack, threats=list(threats), model=model, dataset=dataset, num_images=num_images,
                    batch_size=batch_size, offset=offset, target=target, init=init, normalization=normalization,
                    train_epochs=train_epochs, options=options or {}, update_options=update_options or {}, seed=seed,
                    true_labels=labels.tolist(), total_seconds=time.perf_counter() - start)
    table = experiment.format_table([(f"{attack}/{t}", r["summary"], r["seconds"]) for t, r in results.items()])
    log(table)
    report = dict(settings=settings, results=experiment.json_ready(results), table=table)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        rows = [("truth", images)] + [(t, np.concatenate(
            [rec.images[experiment.metrics.match_order(rec.images, images[i * batch_size:(i + 1) * batch_size])]
             if batch_size > 1 else rec.images for i, rec in enumerate(r["reconstructions"])]))
            for t, r in results.items()]
        experiment.save_grid(os.path.join(out_dir, "grid.png"), rows)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(out_dir, "table.txt"), "w") as f:
            f.write(table + "\n")
    return report


def main(argv):
    common.check_no_positional_args(argv)
    try:
        options = attack_options(_ATTACK.value, _ITERATIONS.value, _RESTARTS.value, _LEARNING_RATE.value, _TV.value,
                                 _DISTANCE.value, _LABELS.value)
    except ValueError as e:
        common.fail(str(e))
    tf.get_logger().setLevel("ERROR")
    from attacks import experiment
    if _CAPTURE.value:
        if not os.path.exists(_CAPTURE.value):
            common.fail(f"--capture {_CAPTURE.value} does not exist")
        if "oracle" in _THREAT.value:
            common.fail("--capture: a capture holds no secret, so threat 'oracle' cannot attack it")
        from tfkl import capture as capture_lib
        try:
            locked = capture_lib.load_capture(_CAPTURE.value).meta["lock"]
        except capture_lib.CaptureFormatError as e:
            common.fail(str(e))
        threats = [t for t in _THREAT.value if (t == "none") != bool(locked)]
        if not threats:
            common.fail(f"none of --threat={','.join(_THREAT.value)} applies to a "
                        f"{'locked' if locked else 'plain'} capture")
        experiment.attack_captures({os.path.basename(_CAPTURE.value): _CAPTURE.value}, _OUT_DIR.value,
                                   _ATTACK.value, options, locked_threats=threats if locked else ("fixed-key",),
                                   seed=_SEED.value)
        print(f"wrote {_OUT_DIR.value}/captures_grid.png and captures_metrics.json")
        return
    update_options = None
    if _TARGET.value == "update":
        update_options = dict(batch_size=_LOCAL_BATCH_SIZE.value, local_epochs=_LOCAL_EPOCHS.value,
                              learning_rate=_CLIENT_LR.value)
    run(_ATTACK.value, _THREAT.value, _MODEL.value, _DATASET.value, _NUM_IMAGES.value, _BATCH_SIZE.value,
        _OFFSET.value, _TARGET.value, _INIT.value, _NORMALIZATION.value, _TRAIN_EPOCHS.value, _TRAIN_EXAMPLES.value,
        options, update_options, _SEED.value, _OUT_DIR.value, _DATA_DIR.value)
    print(f"wrote {_OUT_DIR.value}/grid.png, metrics.json and table.txt")


if __name__ == "__main__":
    app.run(main)
