"""Image metrics for reconstructions: standard, affine-aligned, and the FedKL paper's variants.

Images are float in [0, 1], shape [N, H, W, C]. Standard: MSE, PSNR = 10 log10(1 / MSE), SSIM
(tf.image.ssim, 11x11 Gaussian window or the image size if smaller, max value 1). Affine-aligned: the
reconstruction is first mapped by the least-squares a * x' + b against the truth (per image; train-mode
normalisation at batch 1 makes the gradient blind to brightness and contrast), then clipped to [0, 1].
Paper variants (FedKL's evaluation_metrics.py, on 0-255 pixels): `paper_rmse` is the RMSE they call
"MSE"; `paper_psnr` = 10 log10(255^2 / RMSE).

Success: an image is "recovered" when its aligned SSIM is >= 0.6 (the threshold FedKL's code names)
or, as a separate criterion, its aligned PSNR is >= 20 dB (the FedAvg-leakage literature's); a
success rate comes with its Wilson 95 % score interval and n. Batches are scored after a one-to-one
(Hungarian) matching of reconstructions to true images: that reads the truth, so it is for scoring
only, never for choosing an attack's restart.
"""

import math

import numpy as np
from scipy.optimize import linear_sum_assignment
import tensorflow as tf

NAMES = ("mse", "psnr", "ssim", "aligned_psnr", "aligned_ssim", "paper_rmse", "paper_psnr", "label_accuracy")
# criterion -> (per-image metric, threshold): recovered when the metric is >= the threshold.
CRITERIA = {"ssim": ("aligned_ssim", 0.6), "psnr": ("aligned_psnr", 20.0)}
WILSON_Z = 1.959963984540054  # the standard normal's 97.5 % quantile: a two-sided 95 % interval
# What a one-to-one matching may maximise (aligned metrics) or minimise (mse).
MATCH_METRICS = ("mse", "aligned_psnr", "aligned_ssim")


def affine_align(reconstructed, truth):
    """Per image, a * reconstructed + b with (a, b) the least-squares fit to `truth`, in [0, 1]."""
    x = tf.reshape(tf.cast(reconstructed, tf.float64), (tf.shape(reconstructed)[0], -1))
    y = tf.reshape(tf.cast(truth, tf.float64), (tf.shape(truth)[0], -1))
    x_mean, y_mean = tf.reduce_mean(x, 1, keepdims=True), tf.reduce_mean(y, 1, keepdims=True)
    covariance = tf.reduce_mean((x - x_mean) * (y - y_mean), 1, keepdims=True)
    variance = tf.reduce_mean(tf.square(x - x_mean), 1, keepdims=True)
    a = tf.math.divide_no_nan(covariance, variance)
    aligned = tf.clip_by_value(a * (x - x_mean) + y_mean, 0.0, 1.0)
    return tf.cast(tf.reshape(aligned, tf.shape(truth)), tf.float32)


def _window(images):
    """SSIM's Gaussian window: 11 pixels, or the image size if smaller."""
    return int(min(11, images.shape[1], images.shape[2]))


def psnr(reconstructed, truth):
    """Standard PSNR in dB per image (max value 1); identical images give +inf."""
    mse = tf.reduce_mean(tf.square(tf.cast(reconstructed, tf.float64) - tf.cast(truth, tf.float64)), [1, 2, 3])
    return (10.0 * tf.math.log(1.0 / mse) / tf.math.log(tf.constant(10.0, tf.float64))).numpy()


def image_metrics(reconstructed, truth, raw=None):
    """Per-image metrics (dict of name -> [N] arrays). `raw` is the unclipped reconstruction used
    for the affine fit (default `reconstructed`)."""
    reconstructed = tf.clip_by_value(tf.convert_to_tensor(reconstructed, tf.float32), 0.0, 1.0)
    truth = tf.convert_to_tensor(truth, tf.float32)
    aligned = affine_align(reconstructed if raw is None else tf.convert_to_tensor(raw, tf.float32), truth)
    mse = tf.reduce_mean(tf.square(reconstructed - truth), [1, 2, 3]).numpy()
    pixels_hat = tf.round(reconstructed * 255.0)
    pixels = tf.round(truth * 255.0)
    rmse = tf.sqrt(tf.reduce_mean(tf.square(pixels_hat - pixels), [1, 2, 3])).numpy()
    with np.errstate(divide="ignore"):
        paper_psnr = 10.0 * np.log10(255.0**2 / rmse)
    return {
        "mse": mse.astype(float),
        "psnr": psnr(reconstructed, truth).astype(float),
        "ssim": tf.image.ssim(reconstructed, truth, 1.0, filter_size=_window(truth)).numpy().astype(float),
        "aligned_psnr": psnr(aligned, truth).astype(float),
        "aligned_ssim": tf.image.ssim(aligned, truth, 1.0, filter_size=_window(truth)).numpy().astype(float),
        "paper_rmse": rmse.astype(float),
        "paper_psnr": paper_psnr.astype(float),
    }


def class_means(images, labels, num_classes):
    """[num_classes, H, W, C]: each class's mean image (the mean of all `images` for a class they lack)."""
    images, labels = np.asarray(images, np.float32), np.asarray(labels)
    overall = images.mean(0)
    return np.stack([images[labels == c].mean(0) if np.any(labels == c) else overall for c in range(num_classes)])


def label_accuracy(predicted, truth):
    """Fraction of labels recovered, as multisets (the order within a batch is not identifiable)."""
    predicted, truth = list(np.ravel(predicted)), list(np.ravel(truth))
    hits = 0
    for label in truth:
        if label in predicted:
            predicted.remove(label)
            hits += 1
    return hits / max(len(truth), 1)


def pairwise_metrics(reconstructed, truth, raw=None):
    """`image_metrics` of every reconstruction i against every true image j: {name: [len(rec), len(truth)]}."""
    truth = np.asarray(truth, np.float32)
    rows, cols = len(reconstructed), len(truth)

    def repeat(images):
        return np.repeat(np.asarray(images, np.float32), cols, axis=0)

    values = image_metrics(repeat(reconstructed), np.tile(truth, (rows, 1, 1, 1)), None if raw is None else repeat(raw))
    return {name: array.reshape(rows, cols) for name, array in values.items()}


def match_order(reconstructed, truth, raw=None, by="mse"):
    """The one-to-one (Hungarian) matching of a batch of reconstructions to `truth`: `order` such that
    reconstructed[order][j] is matched to truth[j], minimising the total MSE (`by='mse'`) or maximising the
    total aligned PSNR or SSIM (surplus reconstructions stay unmatched). It reads the truth: for scoring only."""
    if len(reconstructed) < len(truth):
        raise ValueError(f"cannot match {len(reconstructed)} reconstructions one-to-one to {len(truth)} images")
    if by not in MATCH_METRICS:
        raise ValueError(f"unknown matching metric {by!r}; choose from {MATCH_METRICS}")
    if by == "mse":
        r = np.reshape(reconstructed, (len(reconstructed), -1))
        t = np.reshape(truth, (len(truth), -1))
        cost = ((r[:, None, :] - t[None, :, :]) ** 2).mean(-1)
    else:  # maximise the score; an undefined score (NaN) is the worst, a perfect one (+inf) the best
        score = pairwise_metrics(reconstructed, truth, raw)[by]
        cost = -np.nan_to_num(score, nan=-1e9, posinf=1e9, neginf=-1e9)
    rows, cols = linear_sum_assignment(cost)
    order = np.empty(len(truth), int)
    order[cols] = rows
    return order


def match_and_score(reconstructed, truth, raw=None, by="mse"):
    """(order, per-image metrics of the matched batch): see `match_order` and `image_metrics`."""
    order = match_order(reconstructed, truth, raw, by)
    reconstructed = np.asarray(reconstructed)[order]
    return order, image_metrics(reconstructed, truth, None if raw is None else np.asarray(raw)[order])


def recovered(per_image, criterion="ssim"):
    """Per image, whether it counts as recovered under `criterion` ('ssim': aligned SSIM >= 0.6, 'psnr':
    aligned PSNR >= 20 dB; see CRITERIA); an undefined (NaN) metric is not recovered."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown success criterion {criterion!r}; choose from {tuple(CRITERIA)}")
    name, threshold = CRITERIA[criterion]
    values = np.asarray(per_image[name], float)
    with np.errstate(invalid="ignore"):
        return values >= threshold


def wilson_interval(successes, n, z=WILSON_Z):
    """The Wilson score interval (low, high) of a success probability from `successes` out of `n`."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got {successes} of {n}")
    p = successes / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half_width = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


def success_rate(flags):
    """{'n', 'recovered', 'rate', 'low', 'high'} of per-image booleans (Wilson 95 % interval)."""
    flags = np.asarray(flags, bool).ravel()
    n, successes = int(flags.size), int(flags.sum())
    low, high = wilson_interval(successes, n)
    return {"n": n, "recovered": successes, "rate": successes / n, "low": low, "high": high}


def success_summary(per_image):
    """{criterion: success_rate} for each criterion in CRITERIA."""
    return {criterion: success_rate(recovered(per_image, criterion)) for criterion in CRITERIA}


def summarize(values):
    """{name: {'mean', 'std', 'median', 'min', 'max'}} over finite per-image values."""
    summary = {}
    for name, array in values.items():
        array = np.asarray(array, float)
        finite = array[np.isfinite(array)]
        if len(finite) == 0:
            finite = np.array([np.nan])
        summary[name] = {
            "mean": float(np.mean(finite)),
            "std": float(np.std(finite)),
            "median": float(np.median(finite)),
            "min": float(np.min(finite)),
            "max": float(np.max(finite)),
            "count": int(len(array)),
            "infinite": int(np.sum(~np.isfinite(array))),
        }
    return summary
