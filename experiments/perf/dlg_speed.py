"""Our DLG against the original DLG in PyTorch, interleaved per image: wall time and objective
evaluations until the reconstruction first reaches 30 dB PSNR.

  python -m experiments.run --only=dlg_speed

Per Fashion-MNIST test image 0-4, one thread on each side: the PyTorch original
(`torch_side/dlg.py` in .venv-torch: DLG's LeNet with U(-0.5, 0.5) weights from seed 1234, dummy
~ N(0, 1), L-BFGS lr 1 for 300 steps) runs and saves its starting point; then our `attacks.DLG`
starts from that same point (the same weights in Keras layouts, checked through the victim's
gradient, and the same dummy) with the known label (the clients' sparse CE = soft-label CE with
the one-hot truth), the same loss (distance='l2_sum': summed squared gradient differences) and the
same budget of 300 steps, once per optimizer: 'torch' (`attacks.lbfgs.TorchLBFGS`, torch's rules)
and 'tfp' (tfp's L-BFGS with line search, 300 iterations). A monitor reads the PSNR between chunks of 10
evaluations ('torch') or 3 iterations ('tfp'), outside the timed region, so our time and evaluations
to 30 dB are those at the end of the first chunk at >= 30 dB: upper bounds, up to a chunk late.
Tracing and compiling happen before the clock starts (reported as setup time), as torch's model
set-up precedes its clock.
"""

import os
import tempfile

import numpy as np
import tensorflow as tf

import attacks
from attacks import metrics
from experiments import common
from experiments.perf import torch_dlg_reference as reference
from tfkl import data, models

# Chunks of about 10 evaluations: finer chunks would cost more in calls than they gain in resolution.
VARIANTS = {"torch": dict(optimizer="torch", chunk=10), "tfp": dict(optimizer="tfp", chunk=3)}
TARGET_PSNR = reference.TARGET_PSNR
TARGET_RATIO = 1.0


def keras_weights(start_point):
    """The PyTorch DLG LeNet's parameters in Keras layouts: conv OIHW -> HWIO, the dense layer's
    inputs reordered from CHW to HWC flattening. Returns (weights, the victim's gradients)."""

    def convert(prefix):
        get = lambda name: start_point[f"{prefix}{name}"]  # noqa: E731
        arrays = []
        for layer in ("body.0", "body.2", "body.4"):
            arrays += [get(f"{layer}.weight").transpose(2, 3, 1, 0), get(f"{layer}.bias")]
        dense = get("fc.weight")  # [classes, C * H * W]
        channels = arrays[-1].shape[0]
        side = int(round(np.sqrt(dense.shape[1] / channels)))
        dense = dense.reshape(len(dense), channels, side, side).transpose(2, 3, 1, 0).reshape(-1, len(dense))
        return arrays + [dense, get("fc.bias")]

    return convert(""), convert("gradient/")


class StartedDLG(attacks.DLG):
    """attacks.DLG starting from the image `start` instead of its own random draw."""

    def __init__(self, attacker, start, **options):
        super().__init__(attacker, **options)
        self.start = start

    def _initial_images(self, rng, problems, size):
        return np.repeat(np.reshape(self.start, (1, size)), problems, axis=0)


def run_ours(image, label, start_point, variant, steps):
    """Our DLG on one image (H, W, C) from the original's starting point: its per-image record."""
    weights, torch_gradient = keras_weights(start_point)
    victim = models.build("lenet", image.shape, len(weights[-1]), lock=False, init="dlg")
    victim.set_weights(weights)
    target = attacks.client_gradient(victim, image[None], np.array([label]))
    gradient_error = max(float(np.max(np.abs(a - b))) for a, b in zip(target.values, torch_gradient))
    attacker = attacks.AttackerModel(attacks.ServerView.from_model(victim), "none")
    start = start_point["dummy"].transpose(0, 2, 3, 1)
    attack = StartedDLG(attacker, start, iterations=steps, distance="l2_sum", label_mode="given", **VARIANTS[variant])
    record = {"seconds_to_target": None, "evaluations_to_target": None}

    def monitor(snapshot):
        if (
            record["seconds_to_target"] is None
            and metrics.psnr(np.clip(snapshot.images[0], 0, 1), image[None])[0] >= TARGET_PSNR
        ):
            record.update(seconds_to_target=snapshot.seconds, evaluations_to_target=snapshot.evaluations)
        return False

    result = attack.reconstruct(target, labels=np.array([[label]]), monitor=monitor)
    finite = np.all(np.isfinite(result.raw_images))
    final = float(metrics.psnr(result.images, image[None])[0]) if finite else -np.inf
    info = result.info
    return dict(
        record,
        final_psnr=final,
        success=bool(final >= TARGET_PSNR),
        evaluations=info["evaluations"],
        steps=info["iterations"],
        seconds_total=info["optimizer_seconds"],
        setup_seconds=info["seconds"] - info["optimizer_seconds"],
        victim_gradient_max_abs_diff=gradient_error,
    )


def _round(value, digits=3):
    return None if value is None else round(float(value), digits)


def run(quick):
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    settings = dict(
        reference.reference_settings(quick),
        tf_threads=1,
        variants=VARIANTS,
        target_time_ratio=TARGET_RATIO,
        order="per image: the PyTorch original, then ours with each optimizer",
    )
    if quick:
        settings["indices"] = settings["indices"][:1]
    reference_rows, ours = measure(settings)
    return payload(settings, reference_rows, ours)


def measure(settings):
    """Per image, the PyTorch original and then ours from its starting point: (its rows, {variant: our rows})."""
    dataset = data.load(settings["dataset"])
    reference_rows, ours = [], {variant: [] for variant in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for index in settings["indices"]:
            image, label = dataset.x_test[index], int(dataset.y_test[index])
            init = os.path.join(tmp, f"init_{index}.npz")
            doc = reference.run_torch_dlg(image[None], np.array([label]), settings, init_out=init)
            reference_rows.append(dict(doc["records"][0], index=index, label=label))
            start_point = {key.split("/", 1)[1]: value for key, value in np.load(init).items()}  # image 0 of 1
            for variant in VARIANTS:
                record = run_ours(image, label, start_point, variant, settings["lbfgs_steps"])
                if record["victim_gradient_max_abs_diff"] > 1e-4:
                    raise RuntimeError(
                        f"image {index}: our victim's gradient differs from torch's by "
                        f"{record['victim_gradient_max_abs_diff']:.2e}: not the same victim"
                    )
                ours[variant].append(dict(record, index=index, label=label))
    return reference_rows, ours


def payload(settings, reference_rows, ours):
    """The benchmark's payload from the measured rows."""
    reference_results = {
        "per_image": reference_rows,
        "success_rate": float(np.mean([r["success"] for r in reference_rows])),
    }
    comparisons = {variant: reference.compare_with_reference(reference_results, rows) for variant, rows in ours.items()}
    results = {"reference": reference_results, "ours": ours, "comparison": comparisons}

    headline, summary_rows = _summaries(comparisons, ours)
    tables = [
        {
            "title": f"DLG to {TARGET_PSNR:.0f} dB, per image: the PyTorch original and ours from the same start",
            "columns": COLUMNS,
            "rows": _image_rows(reference_rows, ours, comparisons),
        },
        {
            "title": "Medians over images, ours / PyTorch original",
            "columns": [
                "optimizer",
                "time ratio",
                "evaluations ratio",
                "success ours",
                "success original",
                f"target met (<= {TARGET_RATIO}x time, success >= original)",
            ],
            "rows": summary_rows,
        },
    ]
    notes = [
        common.SHARED_MACHINE_NOTE,
        "Each side times only its search: the original from its first closure call, ours the compiled chunks "
        "plus the driver between them. Tracing and compiling ours (a headline figure; setup_seconds per "
        "image in results) is not counted: it is longer than the original's whole search, so for a single "
        "image attacked once ours takes longer end to end.",
        "Evaluations to 30 dB: those done before the first point at >= 30 dB (the original checks each point "
        "its closure gets; ours, the point after each chunk: up to 9 evaluations ('torch') or 3 iterations "
        "('tfp') late). A 'tfp' point has been evaluated by its line search already, which counts it.",
    ]
    return {"settings": settings, "results": results, "tables": tables, "headline": headline, "notes": notes}


def _image_rows(reference_rows, ours, comparisons):
    rows = []
    for position, r in enumerate(reference_rows):
        rows.append(
            [
                r["index"],
                r["label"],
                "PyTorch original",
                _round(r["seconds_to_target"]),
                r["evaluations_to_target"],
                _round(r["final_psnr"], 1),
                r["success"],
                None,
                None,
            ]
        )
        for variant in VARIANTS:
            o, c = ours[variant][position], comparisons[variant]["per_image"][position]
            rows.append(
                [
                    o["index"],
                    o["label"],
                    f"ours, {variant}",
                    _round(o["seconds_to_target"]),
                    o["evaluations_to_target"],
                    _round(o["final_psnr"], 1),
                    o["success"],
                    _round(c["seconds_to_target_ratio"]),
                    _round(c["evaluations_to_target_ratio"]),
                ]
            )
    return rows


def _summaries(comparisons, ours):
    headline, summary_rows = [], []
    for variant, c in comparisons.items():
        ratio, success = c["median_seconds_ratio"], c["success_rate_ours"]
        reference_success = c["success_rate_reference"]
        met = ratio is not None and ratio <= TARGET_RATIO and success >= reference_success
        headline += [
            {
                "metric": f"DLG time to {TARGET_PSNR:.0f} dB, ours ({variant}) / PyTorch original, median",
                "value": ratio,
                "unit": "x",
                "target": f"<= {TARGET_RATIO}x with success rate >= the original's",
                "met": met,
            },
            {
                "metric": f"DLG evaluations to {TARGET_PSNR:.0f} dB, ours ({variant}) / PyTorch original, median",
                "value": c["median_evaluations_ratio"],
                "unit": "x",
            },
            {
                "metric": f"DLG success rate (final PSNR >= {TARGET_PSNR:.0f} dB), ours ({variant})",
                "value": success,
                "unit": "fraction",
                "target": f">= the original's ({reference_success:.2f})",
                "met": success >= reference_success,
            },
            {
                "metric": f"DLG tracing + compiling, ours ({variant}), median (not in the time ratio)",
                "value": float(np.median([o["setup_seconds"] for o in ours[variant]])),
                "unit": "s",
            },
        ]
        summary_rows.append(
            [variant, _round(ratio), _round(c["median_evaluations_ratio"]), success, reference_success, met]
        )
    return headline, summary_rows


COLUMNS = [
    "image",
    "label",
    "optimizer",
    f"s to {TARGET_PSNR:.0f} dB",
    f"evaluations to {TARGET_PSNR:.0f} dB",
    "final PSNR dB",
    "success",
    "time ratio ours/original",
    "evaluations ratio ours/original",
]


if __name__ == "__main__":
    common.run_as_script("dlg_speed", run)
