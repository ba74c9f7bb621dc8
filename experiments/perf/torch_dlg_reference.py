"""Reference figures of the original DLG in PyTorch (experiments/perf/torch_side/dlg.py, in .venv-torch).

Fashion-MNIST test images 0-4 (28x28x1, via `tfkl.data.load`, handed over as .npy files), batch 1,
DLG's LeNet with U(-0.5, 0.5) weights, known label, L-BFGS lr 1: per image the wall time and the
number of gradient evaluations until the reconstruction first reaches 30 dB PSNR, the final PSNR
and the success rate. `compare_with_reference()` puts our TF attack's per-image results against it.
"""

import json
import os
import subprocess
import tempfile

import numpy as np

from experiments import common

TORCH_PYTHON = os.path.join(common.REPO_ROOT, ".venv-torch", "bin", "python")
SCRIPT = "experiments.perf.torch_side.dlg"  # run with -m from the repository root
DATASET = "fashion_mnist"
TARGET_PSNR = 30.0


def reference_settings(quick):
    return {
        "dataset": DATASET,
        "split": "test",
        "indices": [0, 1] if quick else [0, 1, 2, 3, 4],
        "model": "DLG LeNet (sigmoid, U(-0.5,0.5)), 28x28x1, 10 classes",
        "batch_size": 1,
        "label": "known (soft-label CE with the one-hot truth)",
        "optimizer": "L-BFGS lr 1 (torch defaults)",
        "lbfgs_steps": 20 if quick else 300,
        "target_psnr_db": TARGET_PSNR,
        "torch_threads": 1,
        "seed": 1234,
        "psnr": "standard, data range 1, reconstruction clipped to [0, 1]",
    }


def run_torch_dlg(images, labels, settings, init_out=None):
    """Runs the PyTorch DLG on `images` (N, H, W, C) in [0, 1]; returns its JSON document.
    `init_out`: an .npz path for the starting points (see torch_side/dlg.py --init_out)."""
    if not os.path.exists(TORCH_PYTHON):
        raise FileNotFoundError(f"{TORCH_PYTHON} not found: create the PyTorch venv with `make torch-venv`")
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: os.path.join(tmp, f"{name}.npy") for name in ("images", "labels")}
        np.save(paths["images"], images.astype(np.float32))
        np.save(paths["labels"], labels.astype(np.int64))
        out = os.path.join(tmp, "dlg.json")
        subprocess.run(
            [
                TORCH_PYTHON,
                "-m",
                SCRIPT,
                f"--images={paths['images']}",
                f"--labels={paths['labels']}",
                f"--out={out}",
                f"--steps={settings['lbfgs_steps']}",
                f"--target_psnr={TARGET_PSNR}",
                f"--seed={settings['seed']}",
                f"--threads={settings['torch_threads']}",
            ]
            + ([f"--init_out={init_out}"] if init_out else []),
            check=True,
            cwd=common.REPO_ROOT,
        )
        with open(out) as f:
            return json.load(f)


def _median_or_none(values):
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def compare_with_reference(reference, ours):
    """Our attack's per-image results against this reference (both for the same images, in order).

    Args:
      reference: the `results` dict of results/torch_dlg_reference.json.
      ours: a list with one dict per image: {"index", "seconds_to_target", "evaluations_to_target",
        "final_psnr"} (None for a target never reached); same target PSNR as the reference.
    Returns:
      per-image ratios ours/reference of time and evaluations to the target (> 1: ours needs more),
      their medians over images both reached, and both success rates.
    """
    by_index = {r["index"]: r for r in reference["per_image"]}
    missing = [o["index"] for o in ours if o["index"] not in by_index]
    if missing:
        raise ValueError(f"images {missing} are not in the reference (it has {sorted(by_index)})")
    rows = []
    for o in ours:
        r = by_index[o["index"]]
        row = {"index": o["index"], "final_psnr_ours": o["final_psnr"], "final_psnr_reference": r["final_psnr"]}
        for key in ("seconds_to_target", "evaluations_to_target"):
            both = o[key] is not None and r[key] is not None and r[key] > 0
            row[f"{key}_ratio"] = o[key] / r[key] if both else None
        rows.append(row)
    return {
        "per_image": rows,
        "median_seconds_ratio": _median_or_none([r["seconds_to_target_ratio"] for r in rows]),
        "median_evaluations_ratio": _median_or_none([r["evaluations_to_target_ratio"] for r in rows]),
        "success_rate_ours": float(np.mean([o["final_psnr"] >= TARGET_PSNR for o in ours])),
        "success_rate_reference": reference["success_rate"],
    }


def run(quick):
    from tfkl import data  # TensorFlow is needed only to load the images

    settings = reference_settings(quick)
    dataset = data.load(DATASET)
    indices = settings["indices"]
    doc = run_torch_dlg(dataset.x_test[indices], dataset.y_test[indices], settings)
    per_image = [
        {
            "index": index,
            "label": int(dataset.y_test[index]),
            **{
                k: r[k]
                for k in (
                    "seconds_to_target",
                    "evaluations_to_target",
                    "final_psnr",
                    "success",
                    "evaluations",
                    "seconds_total",
                )
            },
        }
        for index, r in zip(indices, doc["records"])
    ]
    reached = [p for p in per_image if p["seconds_to_target"] is not None]
    results = {
        "per_image": per_image,
        "success_rate": float(np.mean([p["success"] for p in per_image])),
        "images_reaching_target": len(reached),
        "median_seconds_to_target": _median_or_none([p["seconds_to_target"] for p in per_image]),
        "median_evaluations_to_target": _median_or_none([p["evaluations_to_target"] for p in per_image]),
        "torch": doc["torch"],
        "image_shape_chw": doc["image_shape"],
    }
    return payload(settings, results)


def payload(settings, results):
    """The benchmark's payload from the original DLG's results."""
    per_image = results["per_image"]
    rows = [
        [
            p["index"],
            p["label"],
            p["seconds_to_target"],
            p["evaluations_to_target"],
            p["final_psnr"],
            p["success"],
            p["evaluations"],
            p["seconds_total"],
        ]
        for p in per_image
    ]
    table = {
        "title": f"Original DLG in PyTorch, {DATASET} test images, batch 1, to {TARGET_PSNR:.0f} dB",
        "columns": [
            "image",
            "label",
            f"s to {TARGET_PSNR:.0f} dB",
            f"evaluations to {TARGET_PSNR:.0f} dB",
            "final PSNR dB",
            "success",
            "evaluations (total)",
            "s (total)",
        ],
        "rows": rows,
    }
    headline = [
        {
            "metric": "PyTorch DLG success rate (final PSNR >= 30 dB)",
            "value": results["success_rate"],
            "unit": "fraction",
        },
        {"metric": "PyTorch DLG median time to 30 dB", "value": results["median_seconds_to_target"], "unit": "s"},
        {
            "metric": "PyTorch DLG median gradient evaluations to 30 dB",
            "value": results["median_evaluations_to_target"],
            "unit": "evaluations",
        },
    ]
    notes = [
        common.SHARED_MACHINE_NOTE + " Times here are absolute (one process, 1 thread): compare them with "
        "our attack only through a run on the same machine (compare_with_reference).",
        "L-BFGS stops a step early when its tolerances are met, so 'evaluations (total)' can be far below 20 x steps.",
    ]
    return {"settings": settings, "results": results, "tables": [table], "headline": headline, "notes": notes}
