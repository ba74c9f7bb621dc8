"""Privacy-utility table: each defence's accuracy after federated training against the strongest
attack on what a curious server sees of one client's update.

  python -m experiments.studies.privacy_utility  # full run, resumable, cached in runs/privacy_utility/
  python -m experiments.studies.privacy_utility --quick  # smoke size (a minute), cache in runs/privacy_utility_quick/

Utility: FedAvg-style training in TFF (tfkl.federated.program, so each run resumes) of the same
LeNet (DLG init, seed 0) on a Fashion-MNIST subset, IID over the clients, every client each round,
uniform client weighting; the same rounds, data and seeds for every defence. Accuracy is the test
accuracy of what the clients get: the global model, or (FedKL) each client's own model with its key
and lock, averaged over the clients.

Privacy: in round 1 (the initial global model) a client trains one step on one image (batch 1)
and sends its update through the defence's process (the real TFF round, `return_client_updates`);
ten images, the same for every defence. iDLG (L-BFGS), Inverting Gradients and GRNN attack the
update under each threat the defence allows; the strongest (highest mean aligned PSNR) is reported.
FedKL: threats fixed-key, adaptive and adaptive-key (oracle, which holds the secret, as a reference row).
DP-FedAvg (TFF's `DifferentiallyPrivateFactory.gaussian_fixed`): without secure aggregation the server
sees each client's clipped update before the noise is added to the sum ('clipped'); 'clipped + noise'
adds the noise the aggregate carries (stddev noise_multiplier * clip) to the one client's update, as
if it were alone in the round (local DP).
"""

import dataclasses
import functools
import json
import os

import numpy as np
import tensorflow  # noqa: F401  (imported before TFF, as the other benchmarks do)

from experiments import cells, common

CACHE_DIRS = {
    False: os.path.join(common.REPO_ROOT, "runs", "privacy_utility"),
    True: os.path.join(common.REPO_ROOT, "runs", "privacy_utility_quick"),
}
FULL = dict(
    train_examples=6000,
    num_clients=10,
    rounds=30,
    test_examples=2000,
    num_images=10,
    attacks={
        "idlg": dict(iterations=500, restarts=1),
        "ig": dict(iterations=1000, restarts=1, tv=1e-4, learning_rate=0.1),
        "grnn": dict(iterations=1000, learning_rate=1e-3),
    },
    dp_clip=0.5,
    dp_noise_multipliers=(0.0, 0.03, 0.1, 0.3, 1.0),
    prune_fractions=(0.5, 0.9, 0.99),
)
QUICK = dict(
    train_examples=300,
    num_clients=3,
    rounds=2,
    test_examples=200,
    num_images=2,
    attacks={"idlg": dict(iterations=5, restarts=1)},
    dp_clip=0.5,
    dp_noise_multipliers=(0.1,),
    prune_fractions=(0.9,),
)
# The threats that do not hold the client's key; 'adaptive-key' knows the lock weights, as a server does
# in round 1 (every client starts from its initial lock).
LOCKED_THREATS = ("fixed-key", "adaptive", "adaptive-key")
BASE = dict(
    model="lenet",
    dataset="fashion_mnist",
    input_shape=(32, 32, 1),
    batch_size=32,
    local_epochs=1,
    learning_rate=0.01,
    momentum=0.9,
    nesterov=True,
    weight_decay=5e-4,
    client_weighting="uniform",
    init="dlg",
    seed=0,
    seeded_keys=True,
)


@dataclasses.dataclass(frozen=True)
class Defence:
    """A defence: its training config overrides and the update views a curious server attacks."""

    name: str
    label: str
    overrides: dict
    views: tuple = ("sent",)  # 'sent', or for DP 'clipped' and 'clipped + noise'


def defences(setting):
    result = [
        Defence("none", "no defence (FedAvg)", dict(algorithm="fedavg")),
        Defence("fedkl_first", "FedKL, lock on conv1", dict(algorithm="fedkl")),
        Defence("fedkl_all", "FedKL, lock on every conv", dict(algorithm="fedkl", lock_where="all")),
        # Every lock after the first normalises activations that earlier locks made client-specific:
        # averaged moving statistics fit no client (see the Table 1 analogue's ResNet-20 runs).
        Defence(
            "fedkl_all_local",
            "FedKL, lock on every conv, local statistics",
            dict(algorithm="fedkl", lock_where="all", statistics="local"),
        ),
    ]
    for z in setting["dp_noise_multipliers"]:
        result.append(
            Defence(
                f"dp_z{z:g}",
                f"DP-FedAvg, clip {setting['dp_clip']:g}, z = {z:g}",
                dict(algorithm="fedavg", dp_clip=setting["dp_clip"], dp_noise_multiplier=z),
                ("clipped", "clipped + noise") if z else ("clipped",),
            )
        )
    for p in setting["prune_fractions"]:
        result.append(Defence(f"prune_{p:g}", f"pruning {p:.0%}", dict(algorithm="fedavg", prune_fraction=p)))
    return result


def _config(setting, defence):
    from tfkl.federated.config import Config

    return Config(
        **BASE, num_clients=setting["num_clients"], clients_per_round=setting["num_clients"], **defence.overrides
    )


def _read_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_json(path, value):
    common.write_json(path, value)


def records(cache_dir):
    """The attack cells' records (`experiments.cells.RecordStore`): one per cell, under attacks/<target>/, named
    <attack>_<threat>.json, its reconstructions beside it (.npy)."""
    return cells.RecordStore(
        cache_dir, lambda c: os.path.join("attacks", c.regime), "{}.json", indent=2, trailing_newline=True
    )


# -- utility ------------------------------------------------------------------------------------
def train_and_evaluate(setting, defence, data, cache_dir, log):
    """Trains (or resumes) the defence's run; returns per-round test accuracy and training metrics."""
    from tfkl.federated import evaluation, program

    config = _config(setting, defence)
    root = os.path.join(cache_dir, "train", defence.name)
    rounds = setting["rounds"]
    program.train(root, config, program.RunOptions(rounds=rounds, keep_rounds=rounds, progress=False), dataset=data)
    curve_path = os.path.join(root, "test_accuracy.json")
    curve = _read_json(curve_path)
    if curve is None or str(rounds) not in curve:
        # Every test example (no public part): the global model, or FedKL clients' own models (entry (a)).
        curve = {
            str(r): a
            for r, a in evaluation.accuracy_by_round(
                root, public_size=0, max_clients=config.num_clients, dataset=data
            ).items()
        }
        _write_json(curve_path, curve)
    log(f"{defence.name}: test accuracy {curve[str(rounds)]:.4f} after {rounds} rounds")
    rows = np.atleast_1d(np.genfromtxt(os.path.join(root, "metrics.csv"), delimiter=",", names=True))
    return dict(
        test_accuracy=[curve[str(r)] for r in range(1, rounds + 1)],
        train_accuracy=[float(v) for v in rows["accuracy"]],
        train_loss=[float(v) for v in rows["loss"]],
        train_seconds=float(np.sum(rows["seconds"])),
        root_dir=os.path.relpath(root, common.REPO_ROOT),
    )


# -- privacy ------------------------------------------------------------------------------------
def captured_updates(config, data, indices):
    """What the server receives in round 1 when a client trains one step on each image alone.

    Returns (ServerView, [full shared update per image, `tfkl.shared_variables` order], victim): the
    update is the process's own client output (defence transforms included); the victim (the client's
    model with its key and round-1 lock) only serves the threats that know part of its secret."""
    from attacks import model as model_lib
    import tfkl
    from tfkl import capture as capture_lib
    from tfkl.federated import client_data
    from tfkl.federated.config import build_process

    process = build_process(config, return_client_updates=True)
    server_state = process.initialize()
    model = config.model_fn()()
    layout = capture_lib.SharedLayout(model, process.parts)
    view = model_lib.ServerView.from_model(model)
    global_t, global_n = process.global_weights(server_state)
    for sent, known in zip(layout.flatten(global_t, global_n), view.weights):
        np.testing.assert_array_equal(sent, known)  # round 1's global model is model_fn's
    key = config.client_key("0") if config.locked else None
    one_step = dataclasses.replace(config, batch_size=1, local_epochs=1)
    datasets = [client_data.client_dataset(one_step, data, [i], shuffle_seed=0) for i in indices]
    states = [process.initial_client_state(key) for _ in indices]
    _, _, _, reports = process.next(server_state, np.float32(config.round_learning_rate(1)), datasets, states)
    updates = [
        layout.flatten(r["update"]["trainable"], r["update"]["non_trainable"] or [np.zeros_like(w) for w in global_n])
        for r in reports
    ]
    if config.locked:
        tfkl.set_key(model, key)
    return view, updates, model


def server_view(update, view_name, config, seed):
    """The update as the server sees it under `view_name` (the DP clipping rule is TF Privacy's)."""
    if view_name == "sent":
        return update
    norm = np.sqrt(sum(float(np.sum(np.square(u, dtype=np.float64))) for u in update))
    clipped = [u * min(1.0, config.dp_clip / norm) for u in update]  # tf.clip_by_global_norm
    if view_name == "clipped":
        return clipped
    rng = np.random.default_rng([seed, 0xD9])
    stddev = config.dp_noise_multiplier * config.dp_clip
    return [(c + rng.normal(0.0, stddev, c.shape)).astype(np.float32) for c in clipped]


def _target(values, view, config):
    from attacks import targets as targets_lib

    trainable = tuple(np.asarray(v, np.float32) for v, t in zip(values, view.trainable) if t)
    return targets_lib.Target(
        "update",
        trainable,
        1,
        1,
        1,
        float(config.round_learning_rate(1)),
        config.momentum,
        config.nesterov,
        config.weight_decay,
    )


def _target_id(defence, view_name, config):
    """Names the server's view so that identical views share their attacks (DP's clipped view
    does not depend on the noise)."""
    if view_name == "sent":
        return defence.name
    noise = f"_noise{config.dp_noise_multiplier:g}" if view_name == "clipped + noise" else ""
    return f"dp_clip{config.dp_clip:g}{noise}"


def attack_defence(setting, defence, data, images, labels, cache_dir, log):
    """{view name: {'target', 'attacks': {'<attack>/<threat>': summary entry}}} for one defence; each attack a
    cell of the engine with one record (attacked again when its options changed), its reconstructions beside it."""
    from attacks import cases, experiment

    config = _config(setting, defence)
    threats = (LOCKED_THREATS + ("oracle",)) if config.locked else ("none",)
    captured = functools.cache(lambda: captured_updates(config, data, list(range(setting["num_images"]))))
    store = records(cache_dir)

    def attack_cell(cell, view_name, options, units):
        (unit,) = units
        log(f"attack {cell.regime}: {cell.attack}/{cell.threat}")
        view, updates, victim = captured()
        targets = [_target(server_view(u, view_name, config, seed=i), view, config) for i, u in enumerate(updates)]
        payload, truth = cases.Payload(view, tuple(targets)), cases.UserData(images, labels)
        secret = cases.threat_secret(cell.threat, victim)
        outcome = experiment.attack_targets(
            cell.attack, payload, cell.threat, truth, secret=secret, attack_options=options
        )
        os.makedirs(store.cell_dir(cell), exist_ok=True)
        reconstructions = np.concatenate([r.images for r in outcome["reconstructions"]])
        np.save(os.path.join(store.cell_dir(cell), unit + ".npy"), reconstructions)
        kept = ("summary", "per_image", "seconds", "recovered_labels")
        yield unit, dict(options=options, **{key: outcome[key] for key in kept})

    result = {}
    for view_name in defence.views:
        target_id, entries = _target_id(defence, view_name, config), {}
        for attack, options in setting["attacks"].items():
            for threat in threats:
                cell, unit = cells.Cell("privacy_utility", target_id, threat, attack, 0), f"{attack}_{threat}"
                if store.has(cell, unit) and store.read(cell, unit)["options"] != options:
                    os.remove(store.path(cell, unit))  # made with other options: attacked again
                attack_view = functools.partial(attack_cell, cell, view_name, options)
                cells.run_pending(store, cell, [unit], attack_view, log=lambda line: None)
                entries[f"{attack}/{threat}"] = store.read(cell, unit)
        result[view_name] = dict(target=target_id, attacks=entries, **_strongest(entries, config.locked))
    return result


def _strongest(entries, locked):
    """{'strongest': the attack/threat with the highest mean aligned PSNR without the secret, and for a lock
    'strongest_oracle': the same among the oracle cells}."""
    by_psnr = lambda names: max(names, key=lambda k: entries[k]["summary"]["aligned_psnr"]["mean"])  # noqa: E731
    chosen = dict(strongest=by_psnr([k for k in entries if not k.endswith("/oracle")]))
    if locked:
        chosen["strongest_oracle"] = by_psnr([k for k in entries if k.endswith("/oracle")])
    return chosen


# -- report -------------------------------------------------------------------------------------
COLUMNS = [
    "defence",
    "server sees",
    "test accuracy (%)",
    "strongest attack",
    "SSIM",
    "PSNR (dB)",
    "aligned PSNR (dB)",
    "label acc (%)",
]
ATTACK_COLUMNS = ["target", "attack/threat", "SSIM", "PSNR (dB)", "aligned PSNR (dB)", "label acc (%)", "seconds"]


def _figures(entry):
    s = entry["summary"]
    return [
        round(s["ssim"]["mean"], 3),
        round(s["psnr"]["mean"], 2),
        round(s["aligned_psnr"]["mean"], 2),
        round(100 * s["label_accuracy"]["mean"], 1),
    ]


def _rows(defence, utility, privacy):
    accuracy = round(100 * utility["test_accuracy"][-1], 2)
    rows = []
    for view_name, view in privacy.items():
        rows.append(
            [defence.label, view_name, accuracy, view["strongest"]] + _figures(view["attacks"][view["strongest"]])
        )
        if "strongest_oracle" in view:
            rows.append(
                [
                    defence.label + " (reference: attacker holds the secret)",
                    view_name,
                    accuracy,
                    view["strongest_oracle"],
                ]
                + _figures(view["attacks"][view["strongest_oracle"]])
            )
    return rows


def _points(results):
    """One point per defence and server view: accuracy and the strongest attack's means (experiments.report.figures)."""
    points = []
    for result in results.values():
        for view_name, view in result["privacy"].items():
            summary = view["attacks"][view["strongest"]]["summary"]
            points.append(
                dict(
                    {k: summary[k]["mean"] for k in ("ssim", "psnr", "aligned_psnr", "label_accuracy")},
                    defence=f"{result['label']} [{view_name}]",
                    attack=view["strongest"],
                    accuracy=result["utility"]["test_accuracy"][-1],
                )
            )
    return points


def save_grid(path, images, results, all_defences, cache_dir):
    """PNG: the true images, then the strongest reconstruction of each table row (affine-aligned)."""
    from attacks import experiment, metrics

    rows = [("truth", images)]
    for defence in all_defences:
        for view_name, view in results[defence.name]["privacy"].items():
            stem = os.path.join(cache_dir, "attacks", view["target"], view["strongest"].replace("/", "_"))
            recon = np.load(stem + ".npy")
            rows.append((f"{defence.name}/{view_name}", metrics.affine_align(recon, images)))
    experiment.save_grid(path, rows)


def run(quick):
    from attacks import study
    from experiments import runtime
    from tfkl import data as data_lib

    setting = QUICK if quick else FULL
    cache_dir = CACHE_DIRS[bool(quick)]
    log = lambda message: print(message, flush=True)  # noqa: E731
    full = data_lib.load(BASE["dataset"])
    n, t = setting["train_examples"], setting["test_examples"]
    data = data_lib.Dataset(
        full.name, full.x_train[:n], full.y_train[:n], full.x_test[:t], full.y_test[:t], full.num_classes
    )
    _, _, images, labels = study.load_images(BASE["dataset"], BASE["model"], setting["num_images"])
    all_defences = defences(setting)
    results, rows, attack_rows = {}, [], []
    runtime.install_context()
    try:
        for defence in all_defences:
            utility = train_and_evaluate(setting, defence, data, cache_dir, log)
            privacy = attack_defence(setting, defence, data, images, labels, cache_dir, log)
            results[defence.name] = dict(
                label=defence.label, overrides=defence.overrides, utility=utility, privacy=privacy
            )
            rows += _rows(defence, utility, privacy)
    finally:
        runtime.shutdown()
    seen = set()
    for defence in all_defences:
        for view in results[defence.name]["privacy"].values():
            if view["target"] not in seen:
                seen.add(view["target"])
                attack_rows += [
                    [view["target"], name] + _figures(entry) + [round(entry["seconds"], 1)]
                    for name, entry in view["attacks"].items()
                ]
    grid = os.path.join(cache_dir, "grid.png")
    save_grid(grid, images, results, all_defences, cache_dir)
    return _payload(setting, dict(defences=results, points=_points(results)), rows, attack_rows, grid)


def _payload(setting, results, rows, attack_rows, grid):
    train_seconds = sum(r["utility"]["train_seconds"] for r in results["defences"].values())
    attack_seconds = sum(row[-1] for row in attack_rows)
    headline = []
    for name, result in results["defences"].items():
        headline.append(
            {
                "metric": f"{name}: test accuracy",
                "unit": "%",
                "value": round(100 * result["utility"]["test_accuracy"][-1], 2),
            }
        )
        for view_name, view in result["privacy"].items():
            entry = view["attacks"][view["strongest"]]
            headline.append(
                {
                    "metric": f"{name} ({view_name}): strongest attack's aligned PSNR ({view['strongest']})",
                    "value": round(entry["summary"]["aligned_psnr"]["mean"], 2),
                    "unit": "dB",
                }
            )
    return {
        "settings": dict(
            setting,
            base_config=BASE,
            locked_threats=list(LOCKED_THREATS),
            utility=f"{setting['num_clients']} IID clients on the first {setting['train_examples']} Fashion-MNIST "
            f"training images, all clients every round, {setting['rounds']} rounds, 1 local epoch, batch 32, "
            f"SGD lr 0.01 momentum 0.9 Nesterov wd 5e-4 (momentum kept per client), uniform client "
            f"weighting, server SGD 1.0; test accuracy on the first {setting['test_examples']} test images",
            privacy=f"round 1 (initial global model), one client step on one image (batch 1), the first "
            f"{setting['num_images']} training images; means over the images",
        ),
        "results": results,
        "tables": [
            {
                "title": "privacy-utility: accuracy vs the strongest attack (means over the images; aligned = after "
                "the best a*x+b fit)",
                "columns": COLUMNS,
                "rows": rows,
            },
            {
                "title": "privacy-utility: every attack on every server view",
                "columns": ATTACK_COLUMNS,
                "rows": attack_rows,
            },
        ],
        "headline": headline,
        "notes": [
            "Attack budgets are smaller than experiments.studies.attack_quality's (iDLG L-BFGS 1,500 its x 2 restarts, "
            f"IG 1,500 x 2, GRNN 1,500): here {json.dumps(setting['attacks'])}, the same for every defence.",
            "Strongest attack = highest mean aligned PSNR among the attacks and the threats that do not hold the "
            "client's key (FedKL: fixed-key, adaptive, adaptive-key; others: none). FedKL's oracle rows (key and "
            "lock known) are a reference.",
            "DP-FedAvg = tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(noise_multiplier, "
            f"clients_per_round={setting['num_clients']}, clip={setting['dp_clip']:g}); TFF does not seed its noise, "
            "so DP accuracies vary between runs. 'clipped' is what a server without secure aggregation receives; "
            "'clipped + noise' adds N(0, (z*clip)^2) per entry, the noise of the whole sum, to the one client's "
            "update (local DP).",
            "Pruning zeroes round(p * size) smallest-magnitude entries of each tensor of the client's update.",
            "The attacked update is round 1's: an untrained network, the attacker's most favourable round.",
            "Reconstructions (strongest attack per row, affine-aligned, under the true images): "
            f"{os.path.relpath(grid, common.REPO_ROOT)}",
            f"Compute behind the figures: training {train_seconds:.0f} s (sum of the round times), attacks "
            f"{attack_seconds:.0f} s; duration_s is this invocation's only (cached parts are read, not rerun).",
            common.SHARED_MACHINE_NOTE,
        ],
    }


if __name__ == "__main__":
    common.run_as_script("privacy_utility", run)
