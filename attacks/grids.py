"""Labelled reconstruction grids a person can read: truth on top, one labelled row per threat, each
reconstruction upscaled (nearest neighbour) with its aligned PSNR and SSIM under it, in green when
the image counts as recovered (aligned SSIM >= 0.6, attacks.metrics.CRITERIA['ssim']).

  grids.save_labelled_grid("grid.png", truth, [("none", rec_none, None), ("adaptive", rec_adaptive, per_image)])
"""

import os
import textwrap

from matplotlib.figure import Figure
import numpy as np

from attacks import metrics
from tfkl.files import atomic_write

# Layout in pixels: the PNG is exactly `grid_shape` pixels (no tight bounding box; a power-of-two dpi
# divides pixel sizes into inches exactly).
DPI = 64
LABEL_WIDTH = 110
LABEL_CHARACTERS = 14  # row labels are wrapped to this many characters per line
CAPTION_HEIGHT = 28
FOOTER_HEIGHT = 20
PAD = 6
FONT_SIZE = 11  # points: 9.8 px at 64 dpi
RECOVERED_COLOUR = "#1a7f37"


def grid_shape(num_rows, num_images, height, width, scale):
    """(height, width) in pixels of a grid of `num_rows` rows (truth included) of `num_images` images."""
    cell_height, cell_width = height * scale + CAPTION_HEIGHT + PAD, width * scale + PAD
    return PAD + num_rows * cell_height + FOOTER_HEIGHT, LABEL_WIDTH + num_images * cell_width + PAD


def upscale(image, scale):
    """[H, W, C] in [0, 1] -> [H * scale, W * scale, 3] by nearest neighbour (grey images become RGB)."""
    image = np.clip(np.asarray(image, np.float32), 0.0, 1.0)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, -1)
    return np.repeat(np.repeat(image, scale, 0), scale, 1)


def save_labelled_grid(path, truth, rows, truth_labels=None, scale=4, align=True):
    """Writes the PNG grid; returns `path`.

    Args:
      truth: the true images [N, H, W, C] in [0, 1] (top row).
      rows: [(label, reconstructions [N, H, W, C] in truth's order, per-image metrics or None)]; the metrics
        (`aligned_psnr`, `aligned_ssim` lists, as attacks.experiment.evaluate gives them) are computed from
        the images when None.
      truth_labels: the true classes, captioned under the truth (optional).
      scale: the upscaling factor.
      align: show each reconstruction after the affine fit its aligned scores use (else as reconstructed).
    """
    truth = np.asarray(truth, np.float32)
    num_images, height, width = truth.shape[:3]
    grid_height, grid_width = grid_shape(len(rows) + 1, num_images, height, width, scale)
    figure = Figure(figsize=(grid_width / DPI, grid_height / DPI), dpi=DPI)
    cell_height, cell_width = height * scale + CAPTION_HEIGHT + PAD, width * scale + PAD

    def place(row, column, image, caption, colour="black"):
        left, top = LABEL_WIDTH + column * cell_width, PAD + row * cell_height
        axes = figure.add_axes(
            [
                left / grid_width,
                1 - (top + height * scale) / grid_height,
                width * scale / grid_width,
                height * scale / grid_height,
            ]
        )
        axes.imshow(upscale(image, scale), interpolation="nearest")
        axes.set_axis_off()
        figure.text(
            (left + width * scale / 2) / grid_width,
            1 - (top + height * scale + 2) / grid_height,
            caption,
            ha="center",
            va="top",
            fontsize=FONT_SIZE,
            color=colour,
            linespacing=1.1,
        )

    def label(row, text):
        top = PAD + row * cell_height + height * scale / 2
        # inside the label column, broken after a '/' (attack/threat, run/threat) before inside a word
        text = textwrap.fill(text.replace("/", "/ "), LABEL_CHARACTERS, break_on_hyphens=False).replace("/ ", "/")
        figure.text(
            PAD / grid_width, 1 - top / grid_height, text, ha="left", va="center", fontsize=FONT_SIZE + 1, weight="bold"
        )

    label(0, "truth")
    for column in range(num_images):
        place(0, column, truth[column], "" if truth_labels is None else f"label {int(truth_labels[column])}")
    for row, (name, images, per_image) in enumerate(rows, start=1):
        images = np.asarray(images, np.float32)
        if len(images) != num_images:
            raise ValueError(f"row {name!r} has {len(images)} images for {num_images} true images")
        if per_image is None:
            per_image = metrics.image_metrics(images, truth)
        shown = np.asarray(metrics.affine_align(images, truth)) if align else images
        recovered = metrics.recovered(per_image, "ssim")
        label(row, name)
        for column in range(num_images):
            caption = f"PSNR {per_image['aligned_psnr'][column]:.1f} dB\nSSIM {per_image['aligned_ssim'][column]:.2f}"
            place(row, column, shown[column], caption, RECOVERED_COLOUR if recovered[column] else "black")
    threshold = metrics.CRITERIA["ssim"][1]
    figure.text(
        PAD / grid_width,
        (FOOTER_HEIGHT / 2) / grid_height,
        f"aligned PSNR, SSIM; green: SSIM >= {threshold}" + ("; images after the affine fit" if align else ""),
        ha="left",
        va="center",
        fontsize=FONT_SIZE,
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as f:
        figure.savefig(f, format="png", dpi=DPI)
    return path
