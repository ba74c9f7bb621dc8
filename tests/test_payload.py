"""The payload between server and attacker: the capture schema, and cases that keep the truth apart."""

import dataclasses
import inspect
import json

import numpy as np
import pytest
import tensorflow as tf

from attacks import cases, experiment, targets
from attacks import model as model_lib
from tfkl import capture as capture_lib
from tfkl import models, private

SHAPE = (8, 8, 1)
HYPERPARAMETERS = dict(batch_size=2, local_epochs=1, learning_rate=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)


def _victim(lock=True, shape=SHAPE):
    return models.build("lenet", shape, 4, lock=lock, seed=3)


def _images(count, seed=0):
    rng = np.random.default_rng(seed)
    return tf.image.resize(rng.uniform(0, 1, (count, 4, 4, 1)).astype(np.float32), SHAPE[:2]).numpy(), rng.integers(
        0, 4, count
    )


def _save(path, model, meta=None):
    shared = [v.numpy() for v in private.shared_variables(model)]
    meta = meta or capture_lib.build_meta(
        model, round_num=1, client_id="3", num_examples=4, num_steps=2, **HYPERPARAMETERS
    )
    capture_lib.save_capture(path, meta, shared, [np.zeros_like(w) for w in shared])
    return path


def test_the_meta_builders_output_validates_and_rebuilds_the_shared_model(tmp_path):
    victim = _victim()
    meta = capture_lib.build_meta(
        victim, round_num=1, client_id=3, num_examples=4, num_steps=2, note="x", **HYPERPARAMETERS
    )
    assert set(capture_lib.REQUIRED_META) <= set(meta) and meta["format"] == capture_lib.FORMAT
    assert meta["architecture"] == json.loads(victim.to_json()) and meta["note"] == "x"
    assert (meta["input_shape"], meta["num_classes"], meta["lock"], meta["client_id"]) == ([8, 8, 1], 4, True, "3")
    capture = capture_lib.load_capture(_save(str(tmp_path / "c.npz"), victim, meta))
    assert capture.meta == json.loads(json.dumps(meta))
    view = model_lib.ServerView.from_capture(capture)
    assert view.names == tuple(v.name for v in private.shared_variables(victim))
    assert view.model_json == victim.to_json()  # one encoding of the architecture, a model's own
    assert targets.from_capture(capture).num_steps == 2


def test_a_capture_naming_another_model_or_input_shape_is_one_clear_error(tmp_path):
    victim = _victim()
    good = capture_lib.build_meta(victim, round_num=1, client_id="3", num_examples=4, num_steps=2, **HYPERPARAMETERS)
    other_model = dict(good, architecture=json.loads(_victim(shape=(16, 16, 1)).to_json()), input_shape=[16, 16, 1])
    other_shape = dict(good, input_shape=[16, 16, 1])
    plain = dict(good, architecture=json.loads(_victim(lock=False).to_json()))
    for name, meta, detail in (
        ("model", other_model, r"shared variable \d+'s shape"),
        ("shape", other_shape, "input_shape"),
        ("plain", plain, "lock"),
    ):
        capture = capture_lib.load_capture(_save(str(tmp_path / f"{name}.npz"), victim, meta))
        with pytest.raises(capture_lib.CaptureFormatError, match=f"does not fit its meta and weights \\({detail}"):
            model_lib.ServerView.from_capture(capture)


def test_an_old_or_foreign_file_is_one_capture_format_error(tmp_path):
    victim = _victim()
    meta = capture_lib.build_meta(victim, round_num=1, client_id="3", num_examples=4, num_steps=2, **HYPERPARAMETERS)
    old = {k: v for k, v in meta.items() if k != "architecture"}
    old.update(format="tfkl-capture/1", model="lenet")
    np.savez(tmp_path / "old.npz", meta=np.array(json.dumps(old)))
    np.savez(tmp_path / "foreign.npz", weights=np.zeros(3))
    (tmp_path / "text.npz").write_text("not a capture")
    for name, message in (
        ("old", "format 'tfkl-capture/1', expected 'tfkl-capture/2'"),
        ("foreign", "meta"),
        ("text", "cannot read"),
    ):
        with pytest.raises(capture_lib.CaptureFormatError, match=message):
            capture_lib.load_capture(str(tmp_path / f"{name}.npz"))
    with pytest.raises(capture_lib.CaptureFormatError, match="lacks"):
        _save(str(tmp_path / "partial.npz"), victim, {k: v for k, v in meta.items() if k != "loss"})


@pytest.mark.parametrize("kind", ["gradient", "update"])
def test_a_cases_payload_holds_no_ground_truth(kind, tmp_path):
    x, y = _images(4)
    victim = _victim()
    payload, truth = cases.simulate_clients(victim, x, y, 2, kind, capture_dir=str(tmp_path), batch_size=1)
    assert [f.name for f in dataclasses.fields(payload)] == ["view", "targets"] and len(payload.targets) == 2
    np.testing.assert_array_equal(truth.images, x)
    np.testing.assert_array_equal(truth.labels, y)
    arrays = list(payload.view.weights) + [v for t in payload.targets for v in t.values]
    pool = np.concatenate([np.ravel(a) for a in arrays])
    assert not np.isin(x.ravel(), pool).any()
    if kind == "update":
        for path in sorted(tmp_path.glob("*.npz")):
            assert "ground_truth" not in capture_lib.load_capture(str(path)).meta
    # The attack entry point takes the payload (and a secret); the truth only reaches scoring (or an attack
    # handed the step labels, `oracle_labels`, which callers opt into by name and label as an oracle).
    parameters = inspect.signature(experiment.run_attack).parameters
    assert "payload" in parameters and not {"images", "labels", "truth"} & set(parameters)
