"""How sharply a victim's gradient depends on its image: what limits gradient inversion on ResNet-20.

  python -m experiments.run --only=gradient_sharpness

For the R regime's images (experiments.studies.regimes, seed 0: 10 Fashion-MNIST images at 32x32, untrained
victims as there), Inverting Gradients' distance (1 - cosine over all trainable variables) between the
gradient of each true image and that of the image plus Gaussian pixel noise (clipped to [0, 1]), for
LeNet, ResNet-20 as a client trains it (BatchNorm by the one image's statistics) and ResNet-20 in
inference mode (BatchNorm by its moving statistics, as Inverting Gradients computes its victims'
gradients). An attack that follows this distance from a random start needs it to fall smoothly
towards the truth; a victim whose gradient is as far from the truth's under a small pixel noise as
under a random image leaves the attack a basin too narrow to find.
"""

import numpy as np

from experiments.studies import regimes

NOISE_LEVELS = (1e-3, 1e-2, 1e-1)
VICTIMS = (  # (label, model, training)
    ("LeNet", "lenet", True),
    ("ResNet-20, training mode (batch statistics)", "resnet20", True),
    ("ResNet-20, inference mode (moving statistics)", "resnet20", False),
)


def distances(model, training, images, labels, seed=0):
    """[images, noise levels + 1] distances between the gradient of each image and those of its noisy
    copies, then that of a uniform-noise image (where the attacks start)."""
    from attacks import base, cases
    from tfkl import models

    victim = models.build(model, images.shape[1:], 10, lock=False, init="pytorch", seed=seed)
    rng = np.random.default_rng(seed)
    rows = []
    for x, y in zip(images, labels):
        gradient = lambda image, y=y: cases.client_gradient(victim, image[None], y[None], training).values  # noqa: E731
        truth = gradient(x)
        noisy = [np.clip(x + level * rng.standard_normal(x.shape), 0, 1).astype(np.float32) for level in NOISE_LEVELS]
        start = rng.uniform(0, 1, x.shape).astype(np.float32)
        # float32 rounding can leave the distance a hair below 0
        rows.append(
            [max(0.0, float(base.gradient_distance(gradient(image), truth, "cosine"))) for image in noisy + [start]]
        )
    return np.array(rows)


def run(quick):
    regime = regimes.REGIMES["R"]
    _, images, labels = regimes.seed_images(regime, 0)
    images, labels = (images[:2], labels[:2]) if quick else (images, labels)
    results = {}
    for name, model, training in VICTIMS:
        d = distances(model, training, images, labels)
        results[name] = {
            "model": model,
            "training": training,
            "per_image": d.tolist(),
            "median": np.median(d, 0).tolist(),
            "min": d.min(0).tolist(),
            "max": d.max(0).tolist(),
        }
    columns = ["victim"] + [f"pixel noise std {level:g}" for level in NOISE_LEVELS] + ["uniform-noise image"]
    rows = [
        [name] + [f"{r['median'][i]:.2g} [{r['min'][i]:.2g}, {r['max'][i]:.2g}]" for i in range(len(NOISE_LEVELS) + 1)]
        for name, r in results.items()
    ]
    sharp = results[VICTIMS[1][0]]["median"][0]
    return {
        "settings": {
            "images": f"experiments.studies.regimes R, seed 0 ({len(images)} Fashion-MNIST images, 32x32, labels true)",
            "victims": [dict(label=v[0], model=v[1], training=v[2], init="pytorch", seed=0) for v in VICTIMS],
            "noise_levels": list(NOISE_LEVELS),
            "distance": "1 - cosine similarity over all trainable variables (Inverting Gradients')",
        },
        "results": results,
        "tables": [
            {
                "title": "Gradient distance between each true image and the image plus pixel noise, and a "
                "uniform-noise image (the attacks' start): median [min, max] over the images",
                "columns": columns,
                "rows": rows,
            }
        ],
        "headline": [
            {
                "metric": "ResNet-20 (training mode): median gradient distance at pixel noise std 0.001",
                "value": round(sharp, 4),
                "unit": "1 - cos",
            }
        ],
        "notes": [
            "Compare the attacks' final distance in results/regimes.json (column \"attack's final loss\").",
        ],
    }


if __name__ == "__main__":
    from experiments import common

    common.run_as_script("gradient_sharpness", run)
