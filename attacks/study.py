"""Attack studies: load images, build (and optionally train) victims, attack them under several
threat models, and write the grid, per-image metrics and the table. Used by tff_programs.attack and
experiments.studies.attack_quality (no flags here)."""

import dataclasses
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
        if base.ADAPTIVE_STRATEGIES[adaptive_strategy].alternates and not experiment.ATTACKS[attack].takes_turns:
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


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """One attack study: which images (`num_images` training images of `dataset` from `offset`, clients of
    `batch_size` each), which victims (`model`, `init`, `normalization`, trained centrally for `train_epochs`
    on `train_examples` images first; `lock_init='private'`: the locked victim draws its own lock weights, so
    'adaptive-key' knows only model_fn's), which target (`target` 'gradient', or 'update' of local SGD with
    `update_options`, see `cases.client_update_capture`), and which attack (`attack` with `options`, a plain
    dict of its hyperparameters, see `experiment.attack_config`) under which `threats`."""

    attack: str
    threats: tuple
    model: str
    dataset: str
    num_images: int
    batch_size: int = 1
    offset: int = 0
    target: str = "gradient"
    init: str = "pytorch"
    normalization: str = "batch"
    train_epochs: int = 0
    train_examples: int = 5000
    options: dict | None = None
    update_options: dict | None = None
    seed: int = 0
    data_dir: str | None = None
    lock_init: str = "shared"


def run(config, out_dir=None, log=print):
    """Attacks the images of a `StudyConfig` under each of its threats; returns the JSON-ready report (and
    writes grid.png, metrics.json, table.txt into `out_dir` if given). The table leads with the images
    recovered per threat (aligned SSIM >= 0.6, Hungarian-matched) and their Wilson interval."""
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # pfor's per-op fallback warnings would flood the progress
    data_set, input_shape, images, labels = load_images(
        config.dataset, config.model, config.num_images, config.offset, config.data_dir
    )
    victims, server_lock_weights = _victims(config, data_set, input_shape, log)

    def progress(threat, done, total, losses):
        log(
            f"[{config.attack}/{threat}] {done}/{total} iterations, best losses "
            f"median {np.median(losses):.3g} min {np.min(losses):.3g}"
        )

    start = time.perf_counter()
    results = experiment.run_threats(
        config.attack,
        victims,
        images,
        labels,
        config.threats,
        config.batch_size,
        config.options,
        config.target,
        capture_dir=out_dir and os.path.join(out_dir, "captures"),
        update_options=config.update_options,
        seed=config.seed,
        progress=progress,
        server_lock_weights=server_lock_weights,
        log=log,
    )
    settings = _settings(config, labels, time.perf_counter() - start)
    rows = [(f"{config.attack}/{t}", r["per_image"], r["seconds"]) for t, r in results.items()]
    table = experiment.format_table(rows)
    log(table)
    report = dict(settings=settings, results=experiment.json_ready(results), table=table)
    if out_dir:
        _write(out_dir, report, results, images, labels, config.batch_size)
    return report


def _victims(config, data_set, input_shape, log):
    """({'plain', 'locked'} victims the threats need, trained if asked; the lock weights the server knows of a
    private lock, else None)."""
    victims = cases.build_victims(
        config.model,
        input_shape,
        data_set.num_classes,
        config.init,
        config.seed,
        config.normalization,
        key_seed=config.seed + 1,
        threats=config.threats,
    )
    server_lock_weights = None
    if config.lock_init == "private" and "locked" in victims:
        server_lock_weights = cases.privatize_lock(victims["locked"], seed=config.seed + 2)
    if config.train_epochs:
        train_victims(victims, data_set, input_shape, config.train_epochs, config.train_examples, config.seed, log)
    return victims, server_lock_weights


def _settings(config, labels, seconds):
    """The report's settings: the study's (without data_dir), the true labels and the time it took."""
    settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "data_dir"}
    settings.update(
        threats=list(config.threats),
        options=config.options or {},
        update_options=config.update_options or {},
        true_labels=labels.tolist(),
        total_seconds=seconds,
    )
    if "adaptive" in config.threats:  # the strategy the adaptive attacker ran (results before it existed ran 'joint')
        settings["adaptive_strategy"] = (config.options or {}).get("adaptive_strategy") or experiment.ATTACKS[
            config.attack
        ].default_adaptive_strategy
    return settings


def _write(out_dir, report, results, images, labels, batch_size):
    """grid.png (truth on top, one row per threat, each client's batch in the truth's order), metrics.json and
    table.txt."""
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for threat, result in results.items():
        ordered = []
        for i, rec in enumerate(result["reconstructions"]):
            truth = images[i * batch_size : (i + 1) * batch_size]
            ordered.append(rec.images[metrics.match_order(rec.images, truth)] if batch_size > 1 else rec.images)
        rows.append((threat, np.concatenate(ordered), result["per_image"]))
    grids.save_labelled_grid(os.path.join(out_dir, "grid.png"), images, rows, truth_labels=labels)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out_dir, "table.txt"), "w") as f:
        f.write(report["table"] + "\n")
