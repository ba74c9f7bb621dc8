"""Gradient-inversion attacks on client gradients/updates, with and without the key-lock.

  python -m tff_programs.attack --attack=idlg --threat=none,oracle,fixed-key,adaptive \\
      --model=lenet --dataset=fashion_mnist --num_images=10 --batch_size=1 --out_dir=runs/attack

Simulated victims (default): the same backbone without the lock (threat 'none') and with it (the
other threats); each client group of --batch_size images gives one single-step gradient
(--target=gradient) or one multi-step FedAvg update of local SGD (--target=update). With
--capture=FILE the binary attacks a captured update from the federated trainer instead (threats
'none' for an unlocked capture, 'fixed-key'/'adaptive' for a locked one; no ground truth, so only
reconstructions and labels are written). With --pool=FILE,FILE,... it attacks several captures of one
client together (a server that watches it over rounds; pool_metrics.json).

Writes grid.png (truth above one row of reconstructions per threat), metrics.json (per threat: images
recovered with the Wilson interval, per image metrics, summary mean/std, timing; settings) and table.txt,
and prints progress and the table: first the images recovered out of n per threat (aligned SSIM >= 0.6,
Hungarian-matched) with the 95 % Wilson interval, then the mean metrics. Threats of one model structure
('oracle' and 'fixed-key') share one compiled attack.
"""

import math
import os

from absl import flags

from attacks import names as attack_names
from tff_programs import common, launch
from tfkl import names

_ATTACK = flags.DEFINE_enum("attack", "idlg", attack_names.ATTACKS, "Attack.")
_THREAT = flags.DEFINE_list(
    "threat",
    ["none", "oracle", "fixed-key", "adaptive"],
    f"Threat models, comma-separated, from {attack_names.THREATS}.",
)
_MODEL = flags.DEFINE_enum("model", "lenet", names.MODELS, "Victim model.")
_DATASET = flags.DEFINE_enum("dataset", "fashion_mnist", names.DATASETS, "Data set of the victim images.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where the data set's files are.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 4, "Images to attack (training images from --offset).", lower_bound=1)
_OFFSET = flags.DEFINE_integer("offset", 0, "Index of the first attacked training image.", lower_bound=0)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 1, "Images per client gradient/update.", lower_bound=1)
_TARGET = flags.DEFINE_enum(
    "target",
    "gradient",
    ("gradient", "update"),
    "Single-step gradient, or a multi-step FedAvg update simulated locally.",
)
_LOCAL_BATCH_SIZE = flags.DEFINE_integer("local_batch_size", 1, "Client batch size (--target=update).", lower_bound=1)
_LOCAL_EPOCHS = flags.DEFINE_integer("local_epochs", 1, "Client epochs (--target=update).", lower_bound=1)
_CLIENT_LR = flags.DEFINE_float("client_learning_rate", 0.01, "Client SGD learning rate (--target=update).")
_CAPTURE = flags.DEFINE_string("capture", None, "Attack this capture file (tfkl.capture format) instead.")
_POOL = flags.DEFINE_list(
    "pool",
    [],
    "Attack these capture files of one client (rounds in order) together instead: each capture's images are "
    "unknowns of their own, the lock's unknowns shared (attacks.pooled).",
)
_POOL_DRIFTS = flags.DEFINE_list(
    "pool_drifts", ["0"], "With --pool: drift strengths of the lock across captures, chosen by held-out entries."
)
_SCORE = flags.DEFINE_bool(
    "score",
    True,
    "With --capture: score against the client's data named in the "
    "capture's ground_truth meta (for evaluation only; the attack never reads it).",
)
_INIT = flags.DEFINE_enum("init", "pytorch", names.INITS, "Victim weight initialisation.")
_NORMALIZATION = flags.DEFINE_enum("normalization", "batch", names.NORMALIZATIONS, "Victim lock normalisation.")
_TRAIN_EPOCHS = flags.DEFINE_integer(
    "train_epochs", 0, "Train each victim centrally for this many epochs first.", lower_bound=0
)
_TRAIN_EXAMPLES = flags.DEFINE_integer("train_examples", 5000, "Training images for --train_epochs.", lower_bound=1)
_ITERATIONS = flags.DEFINE_integer("iterations", None, "Attack iterations (default: the attack's).", lower_bound=1)
_RESTARTS = flags.DEFINE_integer("restarts", None, "Restarts per image (default: the attack's).", lower_bound=1)
_LEARNING_RATE = flags.DEFINE_float("learning_rate", None, "Attack step size (ig, grnn).")
_TV = flags.DEFINE_float("tv", None, "Total-variation weight (default: the attack's).")
_DISTANCE = flags.DEFINE_enum("distance", None, ("l2", "cosine", "grnn"), "Gradient distance (default: the attack's).")
_LABELS = flags.DEFINE_enum("labels", None, ("infer", "joint"), "Label handling (default: the attack's).")
_ADAPTIVE_STRATEGY = flags.DEFINE_enum(
    "adaptive_strategy",
    None,
    attack_names.ADAPTIVE_STRATEGIES,
    "How the 'adaptive' threat searches gamma/beta (default: the attack's, 'relearn'; see attacks/README.md).",
)
_LOCK_LR = flags.DEFINE_float("lock_learning_rate", None, "Step size of the adaptive lock latents (ig, grnn).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the victims' weights and the attacks' starts.")
_OUT_DIR = flags.DEFINE_string("out_dir", "runs/attack", "Output directory.")

flags.register_validator(
    "threat",
    lambda v: bool(v) and all(t in attack_names.THREATS for t in v),
    f"--threat takes a comma-separated list from {attack_names.THREATS}",
)
flags.register_validator("out_dir", common.writable_dir_validator("out_dir"))
flags.register_validator(
    "pool_drifts",
    lambda v: bool(v) and all(_is_non_negative(d) for d in v),
    "--pool_drifts takes non-negative numbers, e.g. 0,0.1,1",
)
flags.register_multi_flags_validator(
    ["capture", "pool"], lambda v: not (v["capture"] and v["pool"]), "--capture and --pool exclude each other"
)
flags.register_validator(
    "client_learning_rate", lambda v: math.isfinite(v) and v > 0, "--client_learning_rate must be positive and finite"
)
flags.register_validator(
    "learning_rate", lambda v: v is None or (math.isfinite(v) and v > 0), "--learning_rate must be positive and finite"
)
flags.register_validator(
    "tv", lambda v: v is None or (math.isfinite(v) and v >= 0), "--tv must be non-negative and finite"
)
flags.register_validator(
    "lock_learning_rate",
    lambda v: v is None or (math.isfinite(v) and v > 0),
    "--lock_learning_rate must be positive and finite",
)
flags.register_multi_flags_validator(
    ["num_images", "batch_size"],
    lambda v: v["num_images"] % v["batch_size"] == 0,
    "--num_images must be a multiple of --batch_size (each client holds --batch_size images)",
)


def _is_non_negative(text):
    try:
        return float(text) >= 0
    except ValueError:
        return False


def _load_captures(paths):
    """The capture files, or one `error:` line naming the one that is missing or unreadable."""
    from tfkl import capture as capture_lib

    captures = []
    for path in paths:
        if not os.path.exists(path):
            common.fail(f"capture {path} does not exist")
        try:
            captures.append(capture_lib.load_capture(path))
        except capture_lib.CaptureFormatError as e:
            common.fail(str(e))
    return captures


def attack_pool(options):
    """Attacks the --pool captures of one client together under each threat that applies to them."""
    import json

    from attacks import experiment, pooled
    from attacks import model as model_lib

    captures = _load_captures(_POOL.value)
    try:
        view, pool = pooled.pool_captures(captures, names=_POOL.value, seed=_SEED.value)
    except pooled.PoolError as e:
        common.fail(str(e))
    locked = bool(captures[0].meta["lock"])
    threats = [t for t in _THREAT.value if t not in ("oracle", "adaptive-key") and (t == "none") != locked]
    if not threats:
        common.fail(f"none of --threat={','.join(_THREAT.value)} applies to {'locked' if locked else 'plain'} captures")
    truths = [_user_data(c.meta) for c in captures] if _SCORE.value else None
    results = {}
    for threat in threats:
        attacker = model_lib.AttackerModel(view, threat, seed=_SEED.value + 7)
        attack = experiment.build_attack(_ATTACK.value, attacker, options, seed=_SEED.value)
        rec, held_out = pooled.attack_pool(attack, pool, [float(d) for d in _POOL_DRIFTS.value])
        entry = {"labels": rec.labels.tolist(), "loss": rec.loss, "drift": rec.info["drift"], "held_out": held_out}
        if truths and all(truths):
            entry["per_image"] = pooled.score(rec, truths)
            entry["success"] = experiment.success(entry["per_image"])
            recovered = experiment.format_success(entry["success"])
            print(f"pooled {len(captures)} captures, {threat}: {recovered} images recovered")
        results[threat] = entry
    os.makedirs(_OUT_DIR.value, exist_ok=True)
    with open(os.path.join(_OUT_DIR.value, "pool_metrics.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {_OUT_DIR.value}/pool_metrics.json")


def _user_data(meta):
    """The capture's true images and labels (its ground_truth's data set), or one error line if unavailable."""
    from attacks import cases
    from tfkl import data

    try:
        return cases.capture_user_data(meta, data_dir=_DATA_DIR.value)
    except data.DataUnavailableError as e:
        common.fail(f"cannot score the attack: {e} (--noscore attacks without scoring)")


def attack_capture(options):
    """Attacks the --capture file under the threats that apply to it."""
    from attacks import experiment
    from tfkl import capture as capture_lib

    if not os.path.exists(_CAPTURE.value):
        common.fail(f"--capture {_CAPTURE.value} does not exist")
    try:
        capture = capture_lib.load_capture(_CAPTURE.value)
    except capture_lib.CaptureFormatError as e:
        common.fail(str(e))
    locked = bool(capture.meta["lock"])
    # A capture holds no secret ('oracle', 'adaptive-key' are impossible); 'none' fits plain captures only.
    threats = [t for t in _THREAT.value if t not in ("oracle", "adaptive-key") and (t == "none") != locked]
    if not threats:
        common.fail(
            f"none of --threat={','.join(_THREAT.value)} applies to a "
            f"{'locked' if locked else 'plain'} capture (use none, or fixed-key/adaptive)"
        )
    truth = _user_data(capture.meta) if _SCORE.value else None
    try:
        experiment.attack_captures(
            {os.path.basename(_CAPTURE.value): _CAPTURE.value},
            _OUT_DIR.value,
            _ATTACK.value,
            options,
            truth_images=truth.images if truth else None,
            truth_labels=truth.labels if truth else None,
            locked_threats=threats if locked else ("fixed-key",),
            seed=_SEED.value,
        )
    except capture_lib.CaptureFormatError as e:
        common.fail(str(e))
    print(f"wrote {_OUT_DIR.value}/captures_grid.png and captures_metrics.json")


def study_config(options):
    """The flags' `attacks.study.StudyConfig` of simulated victims."""
    from attacks import study

    update_options = None
    if _TARGET.value == "update":
        update_options = dict(
            batch_size=_LOCAL_BATCH_SIZE.value, local_epochs=_LOCAL_EPOCHS.value, learning_rate=_CLIENT_LR.value
        )
    return study.StudyConfig(
        attack=_ATTACK.value,
        threats=tuple(_THREAT.value),
        model=_MODEL.value,
        dataset=_DATASET.value,
        num_images=_NUM_IMAGES.value,
        batch_size=_BATCH_SIZE.value,
        offset=_OFFSET.value,
        target=_TARGET.value,
        init=_INIT.value,
        normalization=_NORMALIZATION.value,
        train_epochs=_TRAIN_EPOCHS.value,
        train_examples=_TRAIN_EXAMPLES.value,
        options=options,
        update_options=update_options,
        seed=_SEED.value,
        data_dir=_DATA_DIR.value,
    )


def main(argv):
    import tensorflow as tf

    from attacks import study

    del argv  # launch.parse_flags refused positional arguments
    try:
        options = study.attack_options(
            _ATTACK.value,
            _ITERATIONS.value,
            _RESTARTS.value,
            _LEARNING_RATE.value,
            _TV.value,
            _DISTANCE.value,
            _LABELS.value,
            _ADAPTIVE_STRATEGY.value,
            _LOCK_LR.value,
        )
    except ValueError as e:
        common.fail(str(e))
    tf.get_logger().setLevel("ERROR")
    if _CAPTURE.value:
        attack_capture(options)
        return
    if _POOL.value:
        attack_pool(options)
        return
    try:
        dataset = study.load_data(_DATASET.value, _DATA_DIR.value)
    except (ValueError, OSError, RuntimeError) as e:
        common.fail(str(e))
    if _OFFSET.value + _NUM_IMAGES.value > len(dataset.x_train):
        common.fail(f"--offset + --num_images exceeds the {len(dataset.x_train)} training images")
    study.run(study_config(options), out_dir=_OUT_DIR.value)
    print(f"wrote {_OUT_DIR.value}/grid.png, metrics.json and table.txt")


if __name__ == "__main__":
    launch.run(main)
