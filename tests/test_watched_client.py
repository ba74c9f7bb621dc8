"""A watched client: a small local set (the same each round, or a fresh subset), its captures rebuilt exactly."""

import os

import numpy as np
import pytest
import tensorflow as tf

from attacks import cases, targets
from attacks import model as attack_model
from tests.helpers import finish, start_binary
from tfkl import capture as capture_lib
from tfkl import data, private
from tfkl.federated import client_data, run_dir
from tfkl.federated.client_store import ClientStore
from tfkl.federated.config import Config, ConfigError, ProgramError


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def test_config_refuses_bad_subset_options_and_a_resume_that_changes_them(tmp_path):
    with pytest.raises(ConfigError, match="^examples_per_client must be at least 1, got 0$"):
        Config(examples_per_client=0)
    with pytest.raises(ConfigError, match="^fresh_examples needs examples_per_client"):
        Config(fresh_examples=True)
    config = Config(examples_per_client=8, fresh_examples=True)
    run_dir.check_config(str(tmp_path), config)
    assert run_dir.load_config(str(tmp_path)) == config
    run_dir.check_config(str(tmp_path), config)  # the same run resumes
    with pytest.raises(ProgramError) as refused:
        run_dir.check_config(str(tmp_path), Config(examples_per_client=16, fresh_examples=True))
    assert str(refused.value) == (
        f"{tmp_path} holds another run (examples_per_client: 8 there, 16 here); use a new --root_dir"
    )
    with pytest.raises(ProgramError, match=r"fresh_examples: True there, False here"):
        run_dir.check_config(str(tmp_path), Config(examples_per_client=8))


def test_round_examples_are_a_seeded_subset_in_partition_order():
    partition = np.arange(100, 160)[::-1].copy()  # positions in the partition, not sorted indices
    fixed, fresh = Config(examples_per_client=8), Config(examples_per_client=8, fresh_examples=True)
    rounds = [client_data.round_examples(fixed, partition, "0", r) for r in (1, 2, 3)]
    assert all(np.array_equal(rounds[0], other) for other in rounds[1:]) and len(rounds[0]) == 8
    position = {index: i for i, index in enumerate(partition)}
    assert sorted(rounds[0], key=position.get) == list(rounds[0])
    assert not np.array_equal(rounds[0], client_data.round_examples(fixed, partition, "1", 1))
    drawn = [client_data.round_examples(fresh, partition, "0", r) for r in (1, 2, 3)]
    assert all(len(d) == 8 and set(d) <= set(partition) for d in drawn)
    assert len({tuple(d) for d in drawn}) == 3
    np.testing.assert_array_equal(drawn[1], client_data.round_examples(fresh, partition, "0", 2))
    np.testing.assert_array_equal(client_data.round_examples(Config(), partition, "0", 1), partition)
    np.testing.assert_array_equal(
        client_data.round_examples(Config(examples_per_client=99), partition, "0", 1), partition
    )


def _labels(batches):
    """The sorted labels of (images, labels) batches."""
    return sorted(np.concatenate([y for _, y in batches]).tolist())


def test_a_subset_is_never_served_from_the_partitions_cache_nor_a_stale_one(digits, tmp_path):
    whole, fixed = (
        Config(input_shape=(32, 32, 1), batch_size=4),
        Config(input_shape=(32, 32, 1), batch_size=4, examples_per_client=8),
    )
    fresh = Config(input_shape=(32, 32, 1), batch_size=4, examples_per_client=8, fresh_examples=True)
    partition = np.arange(40)
    client_data.client_dataset(whole, digits, partition, 1, str(tmp_path), "0")
    subset = client_data.round_examples(fixed, partition, "0", 1)
    cached = client_data.client_dataset(fixed, digits, subset, 1, str(tmp_path), "0")
    assert _labels(cached.as_numpy_iterator()) == sorted(digits.y_train[subset].tolist())
    assert len(os.listdir(tmp_path)) == 2  # the partition's file and the subset's
    for round_num in (1, 2):
        drawn = client_data.round_examples(fresh, partition, "0", round_num)
        served = client_data.client_dataset(fresh, digits, drawn, round_num, str(tmp_path), "0")
        assert _labels(served.as_numpy_iterator()) == sorted(digits.y_train[drawn].tolist())
    assert len(os.listdir(tmp_path)) == 2  # a fresh subset is used once: not cached


def _replay_error(capture, batches, state):
    """The largest difference between the captured update and the client's local SGD replayed from the
    capture's global weights on `batches`, with its key and lock from before the round (oracle)."""
    images = tf.constant(np.concatenate([x for x, _ in batches]))
    labels = tf.constant(np.concatenate([y for _, y in batches]))
    (lock,) = private.lock_layers(capture_lib.shared_model(capture))
    secret = {lock.name: (state["key"][0], *state["lock"])}
    attacker = attack_model.AttackerModel(attack_model.ServerView.from_capture(capture), "oracle", secret=secret)
    target = targets.from_capture(capture)
    replayed = targets.simulate(attacker, target, images, labels, tf.zeros([0]))
    assert max(np.abs(v).max() for v in target.values) > 1e-3
    return max(np.abs(p.numpy() - c).max() for p, c in zip(replayed, target.values))


@pytest.mark.slow
@pytest.mark.parametrize("fresh", [False, True], ids=["same-examples", "fresh-examples"])
def test_a_watched_clients_captures_rebuild_each_rounds_examples_and_batches(digits, tmp_path, fresh):
    """Regime M's victim: client 0 of a real 3-round run, captured every round; capture_user_data gives
    that round's 8 images and the 4 batches of 2 it trained on (its captured update replays from them)."""
    root = str(tmp_path / "run")
    args = [
        f"--root_dir={root}",
        "--dataset=digits",
        "--num_clients=3",
        "--model=lenet",
        "--examples_per_client=8",
        "--batch_size=2",
        "--capture_rounds=all",
        "--persist_optimizer_state=false",
    ] + (["--fresh_examples"] if fresh else [])
    assert finish(start_binary("tff_programs.train", "--rounds=3", *args, log=str(tmp_path / "train.log"))) == 0
    store = ClientStore(os.path.join(root, "clients"))
    images = []
    for round_num in (1, 2, 3):
        capture = capture_lib.load_capture(capture_lib.capture_path(root, round_num, "0"))
        assert (capture.meta["num_examples"], capture.meta["num_steps"]) == (8, 4)
        truth = cases.capture_user_data(capture.meta, digits)
        assert [len(y) for _, y in truth.batches] == [2] * 4
        assert _labels(truth.batches) == sorted(truth.labels.tolist())
        assert _replay_error(capture, truth.batches, store.load(round_num - 1, client_ids=["0"])["0"]) < 1e-5
        images.append(truth.images)
    assert [np.array_equal(images[0], later) for later in images[1:]] == [not fresh] * 2
    changed = "--nofresh_examples" if fresh else "--examples_per_client=16"
    log = str(tmp_path / "resume.log")
    assert finish(start_binary("tff_programs.train", "--rounds=4", *args, changed, log=log)) == 1
    field, there, here = ("fresh_examples", True, False) if fresh else ("examples_per_client", 8, 16)
    with open(log) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    assert lines == [f"error: {root} holds another run ({field}: {there!r} there, {here!r} here); use a new --root_dir"]
