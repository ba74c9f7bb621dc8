"""Attack studies: load images, build (and optionally train) victims, attack them under several
threat models, and write the grid, per-image metrics and the table. Used by tff_programs.attack and
benchmarks.attack_quality (no flags here)."""

import json
import os
import time

import numpy as np

from attacks import base, cases, experiment, grids, metrics
from tfkl import data, models, optimizers, training


def attack_options(
    attack,
    iterations=None,
    restarts=None,
    learning_rate=None,
    tv=None,
    distance=None,
    labels=None,
    adaptive_strategy=None,
    lock_learning_rate=None,
):
    """The attack's keyword options from the optional flag values."""
    options = {}
    if adaptive_strategy:
        if base.ADAPTIVE_STRATEGIES[adaptive_strategy][2] and not experiment.ATTACKS[attack].takes_turns:
            turns = " and ".join(name for name, cls in experiment.ATTACKS.items() if cls.takes_turns)
            raise ValueError(f"--adaptive_strategy={adaptive_strategy} applies to {turns} (L-BFGS has no turns)")
        options["adaptive_strategy"] = adaptive_strategy
    for name, value in (("lock_learning_rate", lock_learning_rate), ("learning_rate", learning_rate)):
        if value is not None:
            if attack in ("dlg", "idlg"):
                raise ValueError(f"--{name} applies to ig and grnn (L-BFGS has none)")
            options[name] = value
    if iterations:
        options["iterations"] = iterations
    if restarts:
        options["restarts"] = restarts
    if tv is not None:
        options["tv"] = tv
    if distance:
        options["distance"] = distance
    if labels:
        options["label_mode"] = labels
    return options


def load_data(dataset_name, data_dir=None):
    """The data set (raises tfkl.data.DataUnavailableError when it is not on disk)."""
    return data.load(dataset_name, data_dir)


def load_images(dataset_name, model_name, num_images, offset=0, data_dir=None):
    """(dataset, input_shape, images [N, H, W, C] in [0, 1], labels [N]) from the training split."""
    dataset = load_data(dataset_name, data_dir)
    return (dataset, *training_images(dataset, model_name, num_images, offset))


def training_images(dataset, model_name, num_images, offset=0):
    """(input_shape, images [N, H, W, C] in [0, 1], labels [N]) of `dataset`'s training split, as `model_name`
    takes them."""
    input_shape = models.input_shape(model_name, dataset)
    if offset + num_images > len(dataset.x_train):
        raise ValueError(f"offset + num_images exceeds the {len(dataset.x_train)} training images")
    images = data.preprocess(dataset.x_train[offset : offset + num_images], input_shape).numpy()
    return input_shape, images, dataset.y_train[offset : offset + num_images]


def test_class_means(dataset, input_shape):
    """[classes, H, W, C]: each class's mean image over `dataset`'s test split (which no client trains on), as a
    model of `input_shape` takes it."""
    return metrics.class_means(
        data.preprocess(dataset.x_test, input_shape).numpy(), dataset.y_test, dataset.num_classes
    )


def label_floor(class_means, images, labels):
    """Per-image metrics of the guess that knows only the labels: each image's class mean (`test_class_means`).
    A floor for success rates: an attack near it has shown little beyond the labels (which the attacks here
    recover)."""
    return metrics.image_metrics(class_means[np.asarray(labels)], images)


def train_victims(victims, dataset, input_shape, epochs, examples, seed, log=print):
    """Trains each victim (its own copy) centrally for `epochs` on the first `examples` images."""
    for name, model in victims.items():
        train = data.make_dataset(
            dataset.x_train[:examples], dataset.y_train[:examples], input_shape, 64, shuffle_seed=seed
        )
        trainer = training.Trainer(model, optimizers.TorchSGD(0.01))
        for epoch in range(epochs):
            loss = trainer.fit_epoch(train)
            log(f"trained victim {name}: epoch {epoch + 1}/{epochs} loss {loss:.4f}")


def run(
    attack,
    threats,
    model,
    dataset,
    num_images,
    batch_size=1,
    offset=0,
    target="gradient",
    init="pytorch",
    normalization="batch",
    train_epochs=0,
    train_examples=5000,
    options=None,
    update_options=None,
    seed=0,
    out_dir=None,
    data_dir=None,
    lock_init="shared",
    log=print,
):
    """Attacks `num_images` images under each threat; returns the JSON-ready results (and writes
    grid.png, metrics.json, table.txt into `out_dir` if given). `lock_init='private'`: the locked
    victim draws its own lock weights, so 'adaptive-key' knows only model_fn's."""
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # pfor's per-op fallback warnings would flood the progress
    data_set, input_shape, images, labels = load_images(dataset, model, num_images, offset, data_dir)
    victims = cases.build_victims(
        model, input_shape, data_set.num_classes, init, seed, normalization, key_seed=seed + 1, threats=threats
    )
    server_lock_weights = None
    if lock_init == "private" and "locked" in victims:
        server_lock_weights = cases.privatize_lock(victims["locked"], seed=seed + 2)
    if train_epochs:
        train_victims(victims, data_set, input_shape, train_epochs, train_examples, seed, log)

    def progress(threat, done, total, losses):
        log(
            f"[{attack}/{threat}] {done}/{total} iterations, best losses "
            f"median {np.median(losses):.3g} min {np.min(losses):.3g}"
        )

    start = time.perf_counter()
    results = experiment.run_threats(
        attack,
        victims,
        images,
        labels,
        threats,
        batch_size,
        options,
        target,
        capture_dir=out_dir and os.path.join(out_dir, "captures"),
        update_options=update_options,
        seed=seed,
        progress=progress,
        server_lock_weights=server_lock_weights,
        log=log,
    )
    settings = dict(
        attack=attack,
        threats=list(threats),
        model=model,
        dataset=dataset,
        num_images=num_images,
        batch_size=batch_size,
        offset=offset,
        target=target,
        init=init,
        normalization=normalization,
        lock_init=lock_init,
        train_epochs=train_epochs,
        options=options or {},
        update_options=update_options or {},
        seed=seed,
        true_labels=labels.tolist(),
        total_seconds=time.perf_counter() - start,
    )
    if "adaptive" in threats:  # the strategy the adaptive attacker ran (results before it existed ran 'joint')
        settings["adaptive_strategy"] = (options or {}).get("adaptive_strategy") or experiment.ATTACKS[
            attack
        ].default_adaptive_strategy
    table = experiment.format_table([(f"{attack}/{t}", r["summary"], r["seconds"]) for t, r in results.items()])
    log(table)
    report = dict(settings=settings, results=experiment.json_ready(results), table=table)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        rows = [
            (
                t,
                np.concatenate(
                    [
                        rec.images[
                            experiment.metrics.match_order(rec.images, images[i * batch_size : (i + 1) * batch_size])
                        ]
                        if batch_size > 1
                        else rec.images
                        for i, rec in enumerate(r["reconstructions"])
                    ]
                ),
                r["per_image"],
            )
            for t, r in results.items()
        ]
        grids.save_labelled_grid(os.path.join(out_dir, "grid.png"), images, rows, truth_labels=labels)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(out_dir, "table.txt"), "w") as f:
            f.write(table + "\n")
    return report
