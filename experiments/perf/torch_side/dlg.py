"""The original DLG attack (Zhu et al. 2019) in PyTorch, as a reference for our TF attacks.

Runs in .venv-torch. Recipe of the DLG paper and its code: DLG's LeNet (sigmoid, every weight and
bias U(-0.5, 0.5)), batch 1, the victim's gradient of soft-label cross-entropy with the known
one-hot label, dummy image ~ N(0, 1), L-BFGS (lr 1, PyTorch defaults: up to 20 evaluations per
step) minimising the summed squared gradient difference. For each image it records the wall time
and number of gradient evaluations until the dummy image first reaches the target PSNR, the final
PSNR and whether it is a success (final PSNR >= target). `--init_out` saves each image's starting
point (model parameters, the victim's gradient and the dummy, torch layouts) so that another
implementation can start from it and check that it sees the same gradient.

  .venv-torch/bin/python -m experiments.perf.torch_side.dlg --images=x.npy --labels=y.npy --out=dlg.json
"""

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from experiments.perf.torch_side import fedkl_models


def psnr(x, y):
    """Standard PSNR in dB for images in [0, 1] (the dummy is clipped to that range first)."""
    mse = float(torch.mean((x.clamp(0, 1) - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def soft_cross_entropy(logits, target_distribution):
    return torch.mean(torch.sum(-target_distribution * F.log_softmax(logits, dim=-1), dim=-1))


def attack(image, label, num_classes, steps, target_psnr, seed):
    """DLG on one (1, C, H, W) image; returns its per-image record and its starting point."""
    torch.manual_seed(seed)
    model = fedkl_models.DLGLeNet(image.shape[1], num_classes, image.shape[-1])
    onehot = F.one_hot(torch.tensor([label]), num_classes).float()
    parameters = list(model.parameters())
    true_gradient = [g.detach() for g in torch.autograd.grad(soft_cross_entropy(model(image), onehot), parameters)]
    dummy = torch.randn(image.shape).requires_grad_(True)
    names = [name for name, _ in model.named_parameters()]
    start_point = {name: p.detach().numpy().copy() for name, p in zip(names, parameters)}
    start_point.update({f"gradient/{name}": g.numpy().copy() for name, g in zip(names, true_gradient)})
    start_point["dummy"] = dummy.detach().numpy().copy()
    optimizer = torch.optim.LBFGS([dummy], lr=1)
    record = {"evaluations": 0, "seconds_to_target": None, "evaluations_to_target": None}
    start = time.perf_counter()

    def closure():
        optimizer.zero_grad()
        if record["seconds_to_target"] is None and psnr(dummy.detach(), image) >= target_psnr:
            record["seconds_to_target"] = time.perf_counter() - start
            record["evaluations_to_target"] = record["evaluations"]
        record["evaluations"] += 1
        dummy_gradient = torch.autograd.grad(soft_cross_entropy(model(dummy), onehot), parameters, create_graph=True)
        distance = sum(((d - t) ** 2).sum() for d, t in zip(dummy_gradient, true_gradient))
        distance.backward()
        return distance

    loss = math.nan
    for _ in range(steps):
        loss = float(optimizer.step(closure).detach())
        if not math.isfinite(loss):
            break
    final = psnr(dummy.detach(), image) if torch.isfinite(dummy).all() else -math.inf
    record.update(
        seconds_total=time.perf_counter() - start,
        final_psnr=final,
        final_gradient_distance=loss,
        success=bool(final >= target_psnr),
        seed=seed,
    )
    return record, start_point


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help=".npy of float32 images (N, H, W, C) in [0, 1]")
    parser.add_argument("--labels", required=True, help=".npy of N integer labels")
    parser.add_argument("--out", required=True, help="JSON file for the per-image records")
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=300, help="L-BFGS .step() calls (DLG's code: 300)")
    parser.add_argument("--target_psnr", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=1234, help="DLG's code seeds torch with 1234")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--init_out",
        help="optional .npz for the starting points, keys '<position>/<parameter>', "
        "'<position>/gradient/<parameter>' and '<position>/dummy'",
    )
    args = parser.parse_args()
    if args.steps < 1 or args.threads < 1 or args.num_classes < 2:
        parser.error("--steps and --threads must be positive, --num_classes at least 2")
    torch.set_num_threads(args.threads)
    images = torch.from_numpy(np.load(args.images).astype(np.float32)).permute(0, 3, 1, 2).contiguous()
    labels = np.load(args.labels).astype(np.int64)
    if len(images) != len(labels):
        parser.error("--images and --labels hold different numbers of examples")
    records, start_points = [], {}
    for i in range(len(images)):
        record, start_point = attack(
            images[i : i + 1], int(labels[i]), args.num_classes, args.steps, args.target_psnr, args.seed
        )
        records.append(dict(record, position=i))
        start_points.update({f"{i}/{name}": value for name, value in start_point.items()})
        print(json.dumps(records[-1]), flush=True)
    if args.init_out:
        np.savez(args.init_out, **start_points)
    with open(args.out, "w") as f:
        json.dump(
            {
                "torch": torch.__version__,
                "threads": args.threads,
                "steps": args.steps,
                "target_psnr": args.target_psnr,
                "seed": args.seed,
                "image_shape": list(images.shape[1:]),
                "records": records,
            },
            f,
            indent=2,
        )


if __name__ == "__main__":
    main()
