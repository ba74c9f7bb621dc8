"""Regime M: a curious server watches one client over rounds and attacks its captures together.

  python -m experiments.studies.rounds                                  # every row, seeds 0-2, K = 1, 2, 4, 8
  python -m experiments.studies.rounds --rounds_rows=spatial --rounds_seeds=0 --rounds_counts=1,8
  python -m experiments.studies.rounds --rounds_tabulate_only    # results/rounds.json and .md only

Per (regime, row, seed): one real `tff_programs.train` run (LeNet, Fashion-MNIST, CLIENTS clients, every
client in every round, its update captured each round, momentum buffers fresh each round as the attacker
assumes); the row's flags choose the defence. Then per watched client and K in --rounds_counts, the pooled attack
(`attacks.pooled`: GRNN and IG, each capture's images its own unknowns, the lock's unknowns shared) on its captures of
rounds 1..K, each with the global weights the server sent that round (on M8, --rounds_attacks=ig-repeated assumes
the client trains the same images every round: one set of unknown images for all K captures). Scored per capture
against the images the client trained on (the captures' ground truth, which the attack never reads); success =
aligned SSIM >= 0.6, with Wilson intervals over every image of every watched client and seed. Each (regime, row,
seed) is one process; each (client, K) one record: a killed run resumes where it stopped.
"""

import dataclasses
import glob
import json
import os
import resource
import time

from absl import flags
import numpy as np

from experiments import cells, runtime

REGIMES = {  # name: (what the watched client holds, tff_programs.train flags); fresh examples: a new image each round
    "M1": (
        "a new image each round, one step of batch 1",
        ["--examples_per_client=1", "--fresh_examples", "--batch_size=1"],
    ),
    "M8": ("the same 8 images each round, 4 steps of 2", ["--examples_per_client=8", "--batch_size=2"]),
}
COMPACT_SPATIAL = ("--algorithm=fedkl", "--lock_affine=spatial", "--lock_kernel=compact")
LOCK_NOISES = {  # row: the lock noise's strength s (each round gamma * (1 + s e1), beta + gamma * s e2)
    "compact-noise": 0.5,
    "compact-noise-0.25": 0.25,
    "compact-noise-0.1": 0.1,
}
LOCK_NOISE = LOCK_NOISES["compact-noise"]
PRUNE = 0.9  # the share of each update's entries a pruning client zeroes (the candidates' pruning)
ROWS = {  # name: (label, tff_programs.train flags, the threat the pooled attack runs under)
    "none": ("no defence (the FedAvg control)", ["--algorithm=fedavg-norm"], "none"),
    "paper": ("the paper's lock", ["--algorithm=fedkl"], "adaptive"),
    "spatial": ("the spatial lock", ["--algorithm=fedkl", "--lock_affine=spatial"], "adaptive"),
    "compact": ("the spatial lock, compact kernels", [*COMPACT_SPATIAL], "adaptive"),
    **{
        row: (
            f"the compact spatial lock, lock noise {noise:g}",
            [*COMPACT_SPATIAL, f"--lock_noise={noise}"],
            "adaptive",
        )
        for row, noise in LOCK_NOISES.items()
    },
    "compact-pruned": (
        f"the compact spatial lock, {PRUNE * 100:.0f} % update pruning",
        [*COMPACT_SPATIAL, f"--prune_fraction={PRUNE}"],
        "adaptive",
    ),
}
DP_CLIP = 0.25  # DP-FedAvg's clip: about the median norm of the control's captured updates (0.26, seed 0)
DP_NOISE = {"dp-1": 1.0, "dp-3": 3.0}  # row: noise multiplier (stddev on the sum, in units of the clip)
DP_DELTA = 1e-5


def _dp_row(noise):
    flags_ = [f"--dp_clip={DP_CLIP}", f"--dp_noise_multiplier={noise}", "--client_weighting=uniform"]
    return f"DP-FedAvg, noise {noise:g} x clip", ["--algorithm=fedavg-norm", *flags_], "none"


ROWS.update({row: _dp_row(noise) for row, noise in DP_NOISE.items()})
NOTES = [
    "Under DP-FedAvg the server attacks each update clipped (the noise goes on the sum): GRNN matches squared L2 "
    "distances, which the clip's unknown scale misleads, while IG's cosine distance is scale-free; read the IG rows.",
    "Lock noise: each round the client trains with gamma * (1 + s e1) and beta + gamma * s e2 (e1, e2 standard "
    "normal per entry, drawn from its key and the round); the pooled attack may give each capture its own offset of "
    "the lock's unknowns under a penalty whose strength (drift) it picks by its loss on held-out entries: the "
    "strengths tried are each record's held_out_losses.",
    "Pruning: the client zeroes the smallest 90 % of its update's entries; the attacker compares the kept ones.",
    "<attack>-repeated (M8 only): the attacker assumes the client trains the same images every round: one set of "
    "unknown images shared by the K captures, each capture's order read from its inferred labels (equal labels in "
    "turn); its n counts each of the client's images once.",
    "'adaptive': the attacker optimises the lock's gamma/beta (one scale and shift per channel, or per position and "
    "channel for the spatial lock) shared by the K captures, with each capture's image; it never holds the key.",
]
CLIENTS = 4
WATCHED = (0, 1)
ATTACKS = {  # name: its settings, those of experiments.studies.candidates at batch 1
    "grnn": dict(iterations=1500, learning_rate=1e-3, restarts=2),
    "ig": dict(iterations=1500, restarts=2, tv=1e-4, learning_rate=0.1),
}
# An attack named <attack>-repeated assumes what a regime whose client keeps its images (M8) does: one shared set of
# images for all K captures, each capture's order read from its labels (`attacks.pooled.label_orders`).
REPEATED = "-repeated"
ATTACK_NAMES = [*ATTACKS, *(name + REPEATED for name in ATTACKS)]


def repeats_images(regime):
    return "--fresh_examples" not in REGIMES[regime][1]


def regime_attacks(regime, attack_names):
    """The attacks among `attack_names` that apply to `regime` (a -repeated one where its images repeat)."""
    return [name for name in attack_names if repeats_images(regime) or not name.endswith(REPEATED)]


_REGIMES = flags.DEFINE_list("rounds_regimes", ["M1"], f"Regimes: {list(REGIMES)}.")
_ROWS = flags.DEFINE_list("rounds_rows", list(ROWS), f"Rows (defences): {list(ROWS)}.")
_SEEDS = flags.DEFINE_list("rounds_seeds", ["0", "1", "2"], "Seeds of the training run (weights, keys, data, attack).")
_ATTACKS = flags.DEFINE_list(
    "rounds_attacks", list(ATTACKS), f"Attacks: {ATTACK_NAMES} (-repeated: on regimes whose images repeat only)."
)
_COUNTS = flags.DEFINE_list("rounds_counts", ["1", "2", "4", "8"], "Numbers of captures pooled (K).")
_DRIFTS = flags.DEFINE_list(
    "rounds_drifts", ["0"], "Drift strengths the pooled attack tries (chosen by held-out loss)."
)
_OUT_DIR = flags.DEFINE_string("rounds_out_dir", "runs/rounds", "Where the training runs (and their captures) go.")
_RECORDS_DIR = flags.DEFINE_string("rounds_records_dir", "results/rounds_cells", "Where the per-unit records go.")
_WORKERS = flags.DEFINE_integer("rounds_workers", cells.DEFAULT_WORKERS, "Cells run at once.", lower_bound=1)
_TABULATE_ONLY = flags.DEFINE_bool("rounds_tabulate_only", False, "Run nothing: tabulate what is stored.")
_CELL = flags.DEFINE_string("rounds_cell", None, "Internal: run one cell 'regime/row/seed' in this process.")
flags.register_validator(
    "rounds_regimes", lambda v: set(v) <= set(REGIMES), f"--rounds_regimes must be among {list(REGIMES)}"
)
flags.register_validator("rounds_rows", lambda v: set(v) <= set(ROWS), f"--rounds_rows must be among {list(ROWS)}")
flags.register_validator(
    "rounds_attacks", lambda v: set(v) <= set(ATTACK_NAMES), f"--rounds_attacks must be among {ATTACK_NAMES}"
)
flags.register_validator(
    "rounds_counts", lambda v: all(c.isdigit() and int(c) >= 1 for c in v), "--rounds_counts must be positive integers"
)


def store(out_dir):
    return cells.RecordStore(
        out_dir, lambda cell: f"{cell.regime}/{cell.attack}/seed{cell.seed}", record_name="{}.json"
    )


def cell_of(regime, row, seed, attack):
    return cells.Cell("rounds", f"{regime}-{row}", ROWS[row][2], attack, int(seed))


def run_root(out_dir, regime, row, seed):
    """The training run every attack of (regime, row, seed) reads."""
    return os.path.join(out_dir, f"{regime}-{row}", f"seed{seed}", "run")


def unit(client, count):
    return f"client{client}_k{count:02d}"


def train_argv(regime, row, seed, root, rounds):
    """The training run of a cell: `rounds` rounds, every client's update captured in each."""
    return [
        "tff_programs.train",
        f"--root_dir={root}",
        "--dataset=fashion_mnist",
        "--model=lenet",
        f"--num_clients={CLIENTS}",
        f"--rounds={rounds}",
        "--capture_rounds=all",
        "--persist_optimizer_state=false",
        f"--keep_rounds={rounds}",
        f"--seed={seed}",
        *REGIMES[regime][1],
        *ROWS[row][1],
    ]


def watched_captures(root, client, count):
    """The capture files of `client` in rounds 1..`count` of the run in `root`."""
    paths = [os.path.join(root, "captures", f"round_{r:05d}_client_{client}.npz") for r in range(1, count + 1)]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"the run in {root} has no capture {missing[0]}")
    return paths


def server_sees(capture, row):
    """What the server receives of a captured update: under DP-FedAvg (TFF's central DP) the update clipped to
    DP_CLIP in L2 norm over its trainable entries; the noise goes on the sum, after the server has each update."""
    if row not in DP_NOISE:
        return capture
    norm = np.sqrt(
        sum(np.sum(np.square(u, dtype=np.float64)) for u, t in zip(capture.update, capture.meta["trainable"]) if t)
    )
    scale = min(1.0, DP_CLIP / max(norm, 1e-30))
    return capture._replace(update=[np.asarray(u * scale, u.dtype) for u in capture.update])


def epsilon(noise, rounds, delta=DP_DELTA):
    """DP-FedAvg's (epsilon, delta) after `rounds` rounds of every client (RDP accounting, dp_accounting)."""
    import dp_accounting

    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise), rounds)
    return accountant.get_epsilon(delta)


def with_protocol(pool, row):
    """`pool` as the attacker knows the row's protocol: a pruning row's members compare their kept entries only."""
    if not any(flag.startswith("--prune_fraction") for flag in ROWS[row][1]):
        return pool
    return dataclasses.replace(pool, members=tuple(dataclasses.replace(m, pruned=True) for m in pool.members))


def attack_unit(root, row, attack_name, client, count, drifts, seed, dataset):
    """The record of one watched client's first `count` captures attacked together (see the module doc)."""
    from attacks import cases, experiment, pooled
    from attacks import model as model_lib
    from tfkl import capture as capture_lib

    paths = watched_captures(root, client, count)
    captures = [server_sees(capture_lib.load_capture(path), row) for path in paths]
    view, pool = pooled.pool_captures(captures, names=[os.path.basename(p) for p in paths], seed=seed)
    pool = with_protocol(pool, row)
    threat, base_attack = ROWS[row][2], attack_name.removesuffix(REPEATED)
    attacker = model_lib.AttackerModel(view, threat, seed=seed + 7)
    attack = experiment.build_attack(base_attack, attacker, seed=seed, **ATTACKS[base_attack])
    start = time.perf_counter()
    if attack_name.endswith(REPEATED):
        pool = pooled.label_orders(attacker, pool)
    reconstruction, held_out = pooled.attack_pool(attack, pool, drifts)
    seconds = time.perf_counter() - start
    truths = [cases.capture_user_data(capture.meta, dataset) for capture in captures]
    truths = truths[:1] if pool.orders is not None else truths  # one set of images, the first capture's
    per_image, order = pooled.score(reconstruction, truths)
    labels = np.concatenate([truth.labels for truth in truths])
    save_reconstruction(reconstruction_path(root, attack_name, unit(client, count)), reconstruction, order, truths)
    return {
        "attack": attack_name,
        "client": client,
        "seed": seed,
        "count": count,
        "threat": threat,
        "per_image": per_image,
        "success": experiment.success(per_image),
        "seconds": round(seconds, 1),
        "drift": reconstruction.info["drift"],
        "held_out_losses": held_out,
        "loss": reconstruction.loss,
        "labels": reconstruction.labels.tolist(),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # the cell's process so far
        "true_labels": labels.tolist(),
    }


def reconstruction_path(root, attack_name, unit_name):
    """Where a unit's reconstruction goes, beside its run (the records hold metrics only)."""
    return os.path.join(os.path.dirname(root), "reconstructions", f"{attack_name}_{unit_name}.npz")


def save_reconstruction(path, reconstruction, order, truths):
    """Stores a unit's reconstruction (unclipped) in `order` (each capture's images matched to its true ones:
    `attacks.pooled.score`), with the captures' true images and labels."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    images = np.concatenate([truth.images for truth in truths])
    labels = np.concatenate([truth.labels for truth in truths])
    np.savez(path, reconstruction=reconstruction.raw_images[order], truth=images, labels=labels)


GRID_IMAGES = 16  # a grid shows a pool's first images, capture after capture


def draw_grids(out_dir, records_dir, log=print):
    """A labelled grid per (regime, row, seed, attack) whose reconstructions are under `out_dir`: watched client
    0's largest pool, its first GRID_IMAGES true images over their reconstruction, aligned SSIM and PSNR under
    each; returns the paths written."""
    from attacks import grids

    written = []
    for (regime, row, attack), by_count in stored(records_dir).items():
        drawn = set()  # seeds
        for count in sorted(by_count, reverse=True):
            for record in [r for r in by_count[count] if r["client"] == WATCHED[0] and r["seed"] not in drawn]:
                root = run_root(out_dir, regime, row, record["seed"])
                path = reconstruction_path(root, attack, unit(record["client"], count))
                if not os.path.exists(path):
                    continue
                drawn.add(record["seed"])
                with np.load(path) as saved:
                    truth, rebuilt, labels = (saved[k][:GRID_IMAGES] for k in ("truth", "reconstruction", "labels"))
                metrics = {k: record["per_image"][k][:GRID_IMAGES] for k in ("aligned_psnr", "aligned_ssim")}
                label = f"{attack.upper()}, {ROWS[row][2]}: {count} captures pooled"
                grid = os.path.join(os.path.dirname(root), f"grid_{attack}_client{record['client']}.png")
                written.append(grids.save_labelled_grid(grid, truth, [(label, rebuilt, metrics)], labels))
                log(f"grid: {grid}")
    return written


def train_cached(out_dir, regime, row, seed, rounds, log=print):
    """Trains the run of (regime, row, seed) unless done by the same command (a killed run resumes); its root."""
    root = run_root(out_dir, regime, row, seed)
    argv = cells.module_command(*train_argv(regime, row, seed, root, rounds))
    done = root + ".trained"
    if cells.run_cached([argv], done, json.dumps(argv[2:]), log) is not None:
        with open(done, "w") as f:
            json.dump(argv[2:], f)
    return root


def run_cell(regime, row, seed, attack_names, dirs, counts, drifts, log=print):
    """Trains the run of (regime, row, seed) under dirs[0], then attacks each pending (client, K) unit with each
    attack, its records under dirs[1]."""
    from tfkl import data

    root = train_cached(dirs[0], regime, row, seed, max(counts), log)
    records, dataset = store(dirs[1]), data.load("fashion_mnist")
    by_name = {unit(client, count): (client, count) for client in WATCHED for count in counts}
    for attack_name in regime_attacks(regime, attack_names):
        cell = cell_of(regime, row, seed, attack_name)

        def attack(names, attack_name=attack_name, cell=cell):
            for name in names:
                client, count = by_name[name]
                log(f"{cell}: client {client}, {count} captures pooled")
                yield name, attack_unit(root, row, attack_name, client, count, drifts, seed, dataset)

        cells.run_pending(records, cell, list(by_name), attack, chunk_size=1, log=log)


def units(counts):
    return [unit(client, count) for client in WATCHED for count in counts]


def cell_jobs(dirs, regimes, rows, seeds, attack_names, counts, drifts):
    """One job per (regime, row, seed), every attack in it: this module in `--rounds_cell` mode, skipped when the
    records of all its attacks are stored (dirs: the runs' and the records' directories)."""
    (out_dir, records_dir), jobs = dirs, []
    for regime in regimes:
        for seed in seeds:
            for row in rows:
                argv = cells.module_command(
                    "experiments.studies.rounds",
                    f"--rounds_cell={regime}/{row}/{seed}",
                    f"--rounds_out_dir={out_dir}",
                    f"--rounds_records_dir={records_dir}",
                    "--rounds_attacks=" + ",".join(attack_names),
                    "--rounds_counts=" + ",".join(str(c) for c in counts),
                    "--rounds_drifts=" + ",".join(str(d) for d in drifts),
                )
                attack_cells = [cell_of(regime, row, seed, name) for name in regime_attacks(regime, attack_names)]
                if not attack_cells:
                    continue
                first, *others = attack_cells
                log_path = os.path.join(os.path.dirname(run_root(out_dir, regime, row, seed)), "cell.log")
                name = f"{regime}-{row}/seed{seed}"
                jobs.append(cells.cell_job(store(records_dir), first, units(counts), argv, log_path, name, others))
    return jobs


def stored(out_dir):
    """{(regime, row, attack): {K: [records]}} of every record under `out_dir`, K ascending."""
    found = {}
    for regime in REGIMES:
        for row in ROWS:
            for attack in ATTACK_NAMES:
                pattern = os.path.join(out_dir, f"{regime}-{row}", attack, "seed*", "client*_k*.json")
                for path in sorted(glob.glob(pattern)):
                    with open(path) as f:
                        record = json.load(f)
                    found.setdefault((regime, row, attack), {}).setdefault(record["count"], []).append(record)
    return {key: dict(sorted(by_count.items())) for key, by_count in found.items()}


def pooled_success(records):
    """The success dict over every image of `records`, with the mean aligned SSIM and seconds per attack."""
    from attacks import metrics

    flags_ = np.concatenate([metrics.recovered(r["per_image"], "ssim") for r in records])
    rate = metrics.success_rate(flags_)
    ssim = np.concatenate([r["per_image"]["aligned_ssim"] for r in records])
    seeds = sorted({r["seed"] for r in records})
    memory = [r["peak_rss_gb"] for r in records if "peak_rss_gb" in r]  # records from before it was kept lack it
    return dict(
        rate,
        mean_ssim=float(np.mean(ssim)),
        seconds=float(np.mean([r["seconds"] for r in records])),
        seeds=seeds,
        **({"peak_rss_gb": max(memory)} if memory else {}),
    )


def coverage(records, row_seeds):
    """What a K's cell holds where it is less than its row: its seeds, each with its clients if not all watched."""
    seeds, parts, partial = sorted({r["seed"] for r in records}), [], False
    for seed in seeds:
        clients = sorted({r["client"] for r in records if r["seed"] == seed})
        only = f" client {', '.join(map(str, clients))} only" if clients != list(WATCHED) else ""
        partial |= bool(only)
        parts.append(f"seed {seed}{only}")
    return f" ({'; '.join(parts)})" if seeds != row_seeds or partial else ""


def tabulate(out_dir):
    """The payload of results/rounds.json: per regime, row and K (every K stored) the images recovered, and one
    table."""
    from attacks import experiment

    results, rows, found = {}, [], stored(out_dir)
    counts = sorted({count for by_count in found.values() for count in by_count})
    for (regime, row, attack), by_count in found.items():
        entry = {str(count): pooled_success(records) for count, records in by_count.items()}
        results.setdefault(regime, {}).setdefault(row, {})[attack] = entry
        seeds = sorted({s for e in entry.values() for s in e["seeds"]})
        cells_ = [
            experiment.format_success(entry[str(c)]) + coverage(by_count[c], seeds) if c in by_count else "not run"
            for c in counts
        ]
        label = ROWS[row][0]
        if row in DP_NOISE:
            rounds = max(int(c) for c in entry)
            label += f" (epsilon {epsilon(DP_NOISE[row], rounds):.1f} at delta {DP_DELTA:g} after {rounds} rounds)"
        largest = str(max(int(c) for c in entry))
        memory = [e["peak_rss_gb"] for e in entry.values() if "peak_rss_gb" in e]
        cost = f"{entry[largest]['seconds']:.0f} s at K = {largest}" + (f", {max(memory):.1f} GB" if memory else "")
        rows.append([regime, label, f"{attack}, {ROWS[row][2]}", ", ".join(map(str, seeds)), *cells_, cost])
    columns = ["regime", "defence", "attack, threat", "seeds"] + [f"K = {c}: recovered, 95 % interval" for c in counts]
    columns.append("cost: mean seconds per pooled attack (2 CPU cores, shared), peak memory of the cell's process")
    table = {
        "title": "images recovered (aligned SSIM >= 0.6) by pooling K captures of one client",
        "columns": columns,
        "rows": rows,
    }
    notes = [f"{name}: {text}" for name, (text, _) in REGIMES.items()] + NOTES
    settings = dict(
        clients=CLIENTS,
        watched=list(WATCHED),
        attacks=ATTACKS,
        dataset="fashion_mnist",
        regimes={name: text for name, (text, _) in REGIMES.items()},
    )
    return {"results": results, "tables": [table], "notes": notes, "settings": settings}


def main(argv):
    del argv
    counts, drifts = sorted(int(c) for c in _COUNTS.value), [float(d) for d in _DRIFTS.value]
    dirs = (_OUT_DIR.value, _RECORDS_DIR.value)
    if _CELL.value:
        regime, row, seed = _CELL.value.split("/")
        return run_cell(regime, row, int(seed), _ATTACKS.value, dirs, counts, drifts)
    start = time.perf_counter()
    if not _TABULATE_ONLY.value:
        jobs = cell_jobs(dirs, _REGIMES.value, _ROWS.value, _SEEDS.value, _ATTACKS.value, counts, drifts)
        cells.run_jobs(jobs, _WORKERS.value)
    payload = tabulate(_RECORDS_DIR.value)
    for path in cells.publish("rounds", payload, time.perf_counter() - start, _RECORDS_DIR.value):
        print(path)
    draw_grids(_OUT_DIR.value, _RECORDS_DIR.value)
    if os.path.abspath(_RECORDS_DIR.value) == os.path.abspath(_RECORDS_DIR.default):  # the published records
        from experiments.studies.regimes import table  # here: as __main__, regimes must not import this module again

        for path in table.publish_main_table(start):  # its table has regime M's rows
            print(path)


if __name__ == "__main__":
    runtime.run(main)
