"""Attack quality: DLG, iDLG, IG and GRNN under the four threat models, on the same images.

  python -m benchmarks.attack_quality                 # default set (~15-20 min on 2 CPU cores)
  python -m benchmarks.attack_quality --attack_set=full    # + IG/GRNN on all images, ResNet-20, batch 4
  python -m benchmarks.attack_quality --attack_only=idlg_fashion_mnist --attack_num_images=3

Victims: untrained LeNet (PyTorch init, seed 0) without the lock ('none') and the identical
backbone with the lock (other threats), batch 1 single-step gradients unless stated. Each
experiment writes benchmarks/results/attacks_<name>.json (per image metrics, mean/std/median
summaries, time, iterations/s) and its PNG grid under runs/attack_quality/<name>/; the whole run
also writes benchmarks/results/attack_quality.json (tables + headline) in the benchmarks' format.
"""

import os
import time

from absl import app
from absl import flags
import tensorflow  # noqa: F401  (before absl's main: Keras' Flatten breaks if TF is first imported inside it)

from benchmarks import common

ALL_THREATS = ["none", "oracle", "fixed-key", "adaptive"]
LENET = dict(model="lenet", init="pytorch")


def _experiments(num_images):
    """{set name: [(experiment name, run() keyword arguments)]}."""
    default = []
    for dataset in ("fashion_mnist", "digits"):
        default += [
            (f"dlg_{dataset}", dict(LENET, attack="dlg", threats=["none"], dataset=dataset, num_images=num_images,
                                    options=dict(iterations=1000, restarts=1))),
            (f"idlg_{dataset}", dict(LENET, attack="idlg", threats=ALL_THREATS, dataset=dataset,
                                     num_images=num_images, options=dict(iterations=1500, restarts=2))),
        ]
    default += [
        ("ig_fashion_mnist_4", dict(LENET, attack="ig", threats=ALL_THREATS, dataset="fashion_mnist", num_images=4,
                                    options=dict(iterations=1500, restarts=2, tv=1e-4, learning_rate=0.1))),
        ("grnn_fashion_mnist_4", dict(LENET, attack="grnn", threats=ALL_THREATS, dataset="fashion_mnist",
                                      num_images=4, options=dict(iterations=1500, learning_rate=1e-3))),
        ("idlg_update_fashion_mnist", dict(LENET, attack="idlg", threats=ALL_THREATS, dataset="fashion_mnist",
                                           num_images=4, batch_size=2, target="update",
                                           update_options=dict(batch_size=1, local_epochs=1, learning_rate=0.01),
                                           options=dict(iterations=600, restarts=2))),
    ]
    full = list(default)
    for dataset in ("fashion_mnist", "digits"):
        full += [
            (f"ig_{dataset}", dict(LENET, attack="ig", threats=ALL_THREATS, dataset=dataset, num_images=num_images,
                                   options=dict(iterations=1500, restarts=2, tv=1e-4, learning_rate=0.1))),
            (f"grnn_{dataset}", dict(LENET, attack="grnn", threats=ALL_THREATS, dataset=dataset,
                                     num_images=num_images, options=dict(iterations=1500, learning_rate=1e-3))),
        ]
    full += [
        ("ig_resnet20_trained", dict(model="resnet20", init="pytorch", attack="ig", threats=ALL_THREATS,
                                     dataset="fashion_mnist", num_images=3, train_epochs=2, train_examples=5000,
                                     options=dict(iterations=1000, restarts=1, tv=1e-4, learning_rate=0.1))),
        ("idlg_batch4_fashion_mnist", dict(LENET, attack="idlg", threats=["none", "oracle"], dataset="fashion_mnist",
                                           num_images=8, batch_size=4, options=dict(iterations=1500, restarts=2))),
    ]
    return {"default": default, "full": full}


_SET = flags.DEFINE_enum("attack_set", "default", ("default", "full"), "Which experiments to run.")
_ONLY = flags.DEFINE_list("attack_only", [], "Run only these experiments (names as in the JSON files).")
_NUM_IMAGES = flags.DEFINE_integer("attack_num_images", 10, "Images per data set for the main experiments.", lower_bound=1)
_OUT_DIR = flags.DEFINE_string("attack_out_dir", "runs/attack_quality", "Where the PNG grids go.")


def _row(name, threat, result):
    s = result["summary"]
    med = lambda k: round(s[k]["median"], 2)  # noqa: E731
    mean = lambda k: f"{s[k]['mean']:.2f} ± {s[k]['std']:.2f}"  # noqa: E731
    return [name, threat, med("psnr"), med("ssim"), med("aligned_psnr"), mean("aligned_psnr"),
            round(s["label_accuracy"]["mean"] * 100, 1), round(result["seconds"], 1),
            round(result["iterations_per_second"], 2)]


def run_experiments(names=None, set_name="default", num_images=10, out_dir="runs/attack_quality", log=print):
    """Runs the chosen experiments; returns {name: report} and writes attacks_<name>.json each."""
    from attacks import study
    chosen = _experiments(num_images)[set_name]
    if names:
        known = {n for group in _experiments(num_images).values() for n, _ in group}
        unknown = sorted(set(names) - known)
        if unknown:
            raise ValueError(f"unknown experiments {unknown}; known: {sorted(known)}")
        chosen = [(n, k) for group in _experiments(num_images).values() for n, k in group if n in names]
        chosen = list(dict(chosen).items())
    reports = {}
    for name, kwargs in chosen:
        log(f"== {name}")
        start = time.perf_counter()
        report = study.run(out_dir=os.path.join(out_dir, name), log=log, **kwargs)
        payload = dict(settings=report["settings"], results=report["results"],
                       tables=[_table(name, report)], notes=[f"grid: {os.path.join(out_dir, name, 'grid.png')}"])
        common.write_result(f"attacks_{name}", payload, quick=False, duration_s=time.perf_counter() - start)
        reports[name] = report
    return reports


COLUMNS = ["experiment", "threat", "PSNR median (dB)", "SSIM median", "aligned PSNR median (dB)",
           "aligned PSNR mean ± std", "label acc (%)", "seconds", "iterations/s"]


def _table(name, report):
    return {"title": f"attack quality: {name}", "columns": COLUMNS,
            "rows": [_row(name, t, r) for t, r in report["results"].items()]}


def _headline(reports):
    items = []
    for name, report in reports.items():
        for threat, result in report["results"].items():
            s = result["summary"]
            items.append({"metric": f"{name} {threat}: median aligned PSNR", "value": round(s["aligned_psnr"]["median"], 2),
                          "unit": "dB"})
    return items


def run(quick):
    """The benchmark runner's entry point: quick = 3 images, default set otherwise."""
    reports = run_experiments(num_images=3 if quick else 10)
    return _payload(reports)


def _payload(reports):
    rows = [row for name, report in reports.items() for row in _table(name, report)["rows"]]
    return {
        "settings": {name: report["settings"] for name, report in reports.items()},
        "results": {name: {t: r["summary"] for t, r in report["results"].items()} for name, report in reports.items()},
        "tables": [{"title": "attack quality (batch 1 unless stated; aligned = after the best a*x+b fit)",
                    "columns": COLUMNS, "rows": rows}],
        "headline": _headline(reports),
        "notes": [
            "Standard PSNR/SSIM on [0, 1] images; aligned PSNR after the least-squares affine fit per image "
            "(train-mode normalisation at batch 1 makes the gradient blind to brightness/contrast).",
            "fixed-key: the attacker's own random key and lock weights; adaptive: gamma/beta per locked channel "
            "optimised with the image; oracle: the victim's key and lock weights.",
            common.SHARED_MACHINE_NOTE,
        ],
    }


def main(argv):
    del argv
    start = time.perf_counter()
    try:
        reports = run_experiments(_ONLY.value, _SET.value, _NUM_IMAGES.value, _OUT_DIR.value)
    except ValueError as e:
        raise app.UsageError(str(e))
    if not _ONLY.value:
        path = common.write_result("attack_quality", _payload(reports), quick=False,
                                   duration_s=time.perf_counter() - start)
        print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
