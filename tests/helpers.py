"""Helpers the tests share."""

import gzip
import os
import signal
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kill_group(process):
    """SIGKILLs a binary started with start_new_session=True and the TFF worker it started (same process
    group), by that group's id."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def start_binary(module, *args, log=None, **kwargs):
    """Starts `python -m module` in its own process group, output to the file `log` (TFF workers may hold pipes
    open)."""
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kwargs,
        )


def finish(process, timeout=300):
    """The binary's exit code within `timeout` seconds; its process group is killed either way."""
    try:
        return process.wait(timeout)
    finally:
        kill_group(process)


def write_idx(path, array):
    """Writes `array` as a gzipped IDX file of unsigned bytes (the format of MNIST and Fashion-MNIST)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def start_worker(port, log_path, prefix=()):
    """`python -m tff_programs.worker --port=port` in the background, run through `prefix` if given (e.g.
    `ip netns exec NAME`, which execs it: same PID); returns its Popen."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [*prefix, sys.executable, "-m", "tff_programs.worker", f"--port={port}"],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def fedkl_rounds(workers_by_name, rounds=2):
    """The same FedKL rounds (LeNet with a lock, 4 clients of 20 digits, each with its own key) once per
    entry of `workers_by_name` ({name: list of host:port}; [] = TFF's local context), in that order, each
    on `contexts.install_context(workers=...)`: {name: (shared weights, client states)}. The last context
    stays installed."""
    from tff_programs import contexts
    import tfkl
    from tfkl import data, models, optimizers
    from tfkl.federated import build_fedkl_process

    shape = (16, 16, 1)
    digits = data.load("digits")
    process = build_fedkl_process(
        lambda: models.build("lenet", shape, 10, lock=True, seed=3, key_dim=16), optimizers.TorchSGD(0.05)
    )
    datasets = [
        data.make_dataset(digits.x_train[20 * i : 20 * i + 20], digits.y_train[20 * i : 20 * i + 20], shape, 10)
        for i in range(4)
    ]
    keys = [tfkl.generate_key(16, seed=100 + i) for i in range(4)]
    results = {}
    for name, workers in workers_by_name.items():
        contexts.install_context(workers=workers)
        server_state = process.initialize()
        client_states = [process.initial_client_state(key) for key in keys]
        for _ in range(rounds):
            server_state, client_states, _, _ = process.next(server_state, np.float32(0.05), datasets, client_states)
        results[name] = (process.global_weights(server_state)[0], client_states)
    return results


def assert_same_fedkl_results(got, want):
    """`got` and `want` from fedkl_rounds: the same shared weights (to float tolerance) and every client
    handed back its own key and lock (locks differ between clients). Returns the largest absolute
    difference of the shared weights."""
    (got_shared, got_clients), (want_shared, want_clients) = got, want
    for g, w in zip(got_shared, want_shared, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    for client, (g, w) in enumerate(zip(got_clients, want_clients, strict=True)):
        np.testing.assert_array_equal(g["key"][0], w["key"][0], err_msg=f"client {client}")
        for got_lock, want_lock in zip(g["lock"], w["lock"], strict=True):
            np.testing.assert_allclose(got_lock, want_lock, rtol=1e-4, atol=1e-5, err_msg=f"client {client}")
    assert not np.allclose(want_clients[0]["lock"][0], want_clients[1]["lock"][0])  # locks are per client
    return max(float(np.max(np.abs(np.asarray(g) - np.asarray(w)))) for g, w in zip(got_shared, want_shared))
