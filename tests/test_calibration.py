"""Calibration: ECE by hand, temperature scaling on a really trained head, the served probabilities."""

from __future__ import annotations

import json
import logging

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.special import softmax

from headstart.backbones.loading import build_feature_extractor, load_backbone
from headstart.calibration import (
    TEMPERATURE_BOUNDS,
    adaptive_calibration_error,
    apply_temperature,
    calibrate,
    ece_intervals,
    expected_calibration_error,
    fit_temperature,
    read_calibration,
    reliability_table,
    served_probabilities,
)
from headstart.data.artifacts import ArtifactError
from headstart.layout import Layout
from headstart.model import build_head
from headstart.params import EvaluateParams, TrainHeadParams
from headstart.uncertainty import index_blocks


def test_ece_matches_a_hand_computation():
    labels = np.array([0, 1, 1, 0, 2])
    probs = np.array([[0.90, 0.05, 0.05],   # conf 0.90, right  -> bin (0.8, 1.0]
                      [0.20, 0.70, 0.10],   # conf 0.70, right  -> bin (0.6, 0.8]
                      [0.55, 0.35, 0.10],   # conf 0.55, wrong  -> bin (0.4, 0.6]
                      [0.15, 0.10, 0.75],   # conf 0.75, wrong  -> bin (0.6, 0.8]
                      [0.34, 0.33, 0.33]])  # conf 0.34, wrong  -> bin (0.2, 0.4]
    # gaps: 0.34 (1 image) + 0.55 (1) + |0.5 - 0.725| (2) + 0.1 (1), over 5 images
    assert expected_calibration_error(labels, probs, bins=5) == pytest.approx((0.34 + 0.55 + 2 * 0.225 + 0.1) / 5)
    table = reliability_table(labels, probs, bins=5)
    assert table["bin"].tolist() == [1, 2, 3, 4] and table["count"].tolist() == [1, 1, 2, 1]
    assert table["accuracy"].tolist() == [0, 0, 0.5, 1] and table["confidence"].tolist() == pytest.approx(
        [0.34, 0.55, 0.725, 0.9])
    # one bin: |accuracy - mean confidence|; a confidence of exactly 1 falls in the last bin
    assert expected_calibration_error(labels, probs, bins=1) == pytest.approx(abs(0.4 - probs.max(1).mean()))
    assert reliability_table(np.array([0]), np.array([[1.0, 0.0]]), 15)["bin"].tolist() == [14]


def test_scaled_probabilities_equal_softmax_of_scaled_logits():
    """softmax(log p / T) == softmax(z / T) for float32 softmax outputs, also far in the tails."""
    logits = np.random.default_rng(0).normal(0, 12, (2, 50, 6))
    probs = softmax(logits, axis=-1).astype(np.float32)
    for temperature in (0.5, 1.0, 2.7):
        expected = softmax(logits / temperature, axis=-1)
        np.testing.assert_allclose(served_probabilities(probs[:1], temperature), expected[0], atol=1e-6)
        np.testing.assert_allclose(served_probabilities(probs, temperature), expected.mean(0), atol=1e-6)


@pytest.fixture(scope="module")
def overconfident_head(trained_tree, fashion_arrays) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(labels, probabilities) per split of a real head trained to overfit on real MobileNetV2 features
    of 2,000 Fashion-MNIST images (10 classes): 1,000 train, 500 val, 500 test."""
    images, labels = fashion_arrays
    backbone = load_backbone("mobilenet_v2_tv", "packaged", 32, trained_tree.backbone_dir)
    pixels = tf.image.resize(np.repeat(images[..., None], 3, axis=-1).astype(np.float32), (32, 32)).numpy()
    features = build_feature_extractor(backbone).predict(pixels, batch_size=250, verbose=0)
    keras.utils.set_random_seed(0)
    head = build_head(features.shape[1], 10, TrainHeadParams(dropout=0, l2=0))
    head.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    head.fit(features[:1000], labels[:1000], epochs=40, batch_size=64, verbose=0)
    return {split: (labels[part], head.predict(features[part], verbose=0))
            for split, part in (("val", slice(1000, 1500)), ("test", slice(1500, 2000)))}


@pytest.mark.slow
def test_temperature_fitted_on_val_lowers_ece_on_val_and_held_out_test(overconfident_head):
    val_labels, val_probs = overconfident_head["val"]
    temperature = fit_temperature(val_labels, val_probs[None])
    assert temperature > 1.2  # an overfitted head is overconfident: scaling must soften it

    def nll(t: float) -> float:
        return -np.log(served_probabilities(val_probs[None], t)[np.arange(len(val_labels)), val_labels]).mean()

    assert nll(temperature) < min(nll(temperature * 1.05), nll(temperature / 1.05), nll(1.0))
    for split, (labels, probs) in overconfident_head.items():
        before = expected_calibration_error(labels, probs, 15)
        after = expected_calibration_error(labels, served_probabilities(probs[None], temperature), 15)
        assert after < 0.6 * before, (split, before, after)
        np.testing.assert_array_equal(served_probabilities(probs[None], temperature).argmax(1), probs.argmax(1))


def test_temperature_goes_into_the_softmax_layer_and_nothing_else():
    keras.utils.set_random_seed(1)
    head = build_head(8, 3, TrainHeadParams(hidden_layers=0, dropout=0))
    features = np.random.default_rng(1).normal(0, 3, (16, 8)).astype(np.float32)
    before = head.predict(features, verbose=0)
    apply_temperature(keras.Model(head.inputs, head(head.inputs)), 2.5)  # found inside a nested model
    np.testing.assert_allclose(head.predict(features, verbose=0), served_probabilities(before[None], 2.5), atol=1e-6)

    plain = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3, activation="softmax", name="dense")])
    with pytest.raises(ValueError, match="exactly one softmax Dense layer named 'probabilities'"):
        apply_temperature(plain, 2.0)


def test_missing_or_bad_calibration_record_names_the_file(tmp_path):
    layout = Layout(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"metrics\.json not found: run `headstart evaluate` first"):
        read_calibration(layout)
    layout.metrics_file.write_text(json.dumps({"test": {"accuracy": 0.9}}))
    with pytest.raises(ArtifactError, match=r"metrics\.json: calibration: .*rerun `headstart evaluate`"):
        read_calibration(layout)
    layout.metrics_file.write_text(json.dumps({"test": {}, "calibration": {"temperature": 0, "fitted": True,
                                                                           "bins": 15, "decision": "kept",
                                                                           "reason": "r"}}))
    with pytest.raises(ArtifactError, match=r"calibration\.temperature: Input should be greater than 0"):
        read_calibration(layout)


def test_equal_mass_ece_matches_a_hand_computation():
    labels = np.array([0, 1, 1, 0, 2, 2])
    probs = np.array([[0.90, 0.05, 0.05], [0.20, 0.70, 0.10], [0.55, 0.35, 0.10],
                      [0.15, 0.10, 0.75], [0.34, 0.33, 0.33], [0.10, 0.10, 0.80]])
    # sorted confidences 0.34 (wrong), 0.55 (wrong) | 0.70 (right), 0.75 (wrong) | 0.80 (right), 0.90 (right)
    expected = (abs(0 - 0.89) + abs(1 - 1.45) + abs(2 - 1.70)) / 6
    assert adaptive_calibration_error(labels, probs, bins=3) == pytest.approx(expected)
    assert adaptive_calibration_error(labels, probs, bins=1) == pytest.approx(expected_calibration_error(labels, probs, 1))
    assert adaptive_calibration_error(labels, probs, bins=50) == pytest.approx(  # more bins than images: one each
        np.abs((probs.argmax(1) == labels) - probs.max(1)).mean())


def test_ece_intervals_are_the_bootstrap_of_both_eces(overconfident_head):
    labels, probs = overconfident_head["test"]
    found = ece_intervals(labels, probs, 15, 200, seed=0)
    by_hand = {"ece": [], "ece_adaptive": []}
    for indices in index_blocks(len(labels), 200, 0):  # the same draws, scored one resample at a time
        for row in indices:
            by_hand["ece"].append(expected_calibration_error(labels[row], probs[row], 15))
            by_hand["ece_adaptive"].append(adaptive_calibration_error(labels[row], probs[row], 15))
    for key, samples in by_hand.items():
        assert (found[key]["low"], found[key]["high"]) == pytest.approx(tuple(np.percentile(samples, [2.5, 97.5])))
    assert found["ece"]["low"] < expected_calibration_error(labels, probs, 15) < found["ece"]["high"]


def test_a_temperature_that_helps_on_held_out_val_folds_is_kept(overconfident_head):
    labels, probs = overconfident_head["val"]
    record = calibrate({"val": labels}, {"val": probs[None]}, EvaluateParams())
    assert record["decision"] == "kept" and record["temperature"] == record["candidate_temperature"] > 1.2
    assert record["heldout_log_loss_scaled"] < record["heldout_log_loss_unscaled"]
    assert record["reason"].startswith(f"Temperature T = {record['temperature']:.4f} kept")


def test_a_temperature_that_does_not_help_on_held_out_folds_is_declined(overconfident_head):
    """Probabilities already scaled by the T that suits them: a T refitted on four folds only adds noise."""
    labels, probs = overconfident_head["val"]
    calibrated = served_probabilities(probs[None], fit_temperature(labels, probs[None]))
    record = calibrate({"val": labels}, {"val": calibrated[None]}, EvaluateParams())
    assert record["decision"] == "declined" and record["temperature"] == 1.0 and record["fitted"]
    assert record["heldout_log_loss_scaled"] >= record["heldout_log_loss_unscaled"]
    assert "T = 1 kept" in record["reason"] and "does not lower the log loss" in record["reason"]


def test_a_tiny_or_mistake_free_val_split_keeps_t_at_one(overconfident_head, caplog):
    labels, probs = overconfident_head["val"]
    right = np.flatnonzero(probs.argmax(1) == labels)[:60]  # no mistakes: any T < 1 lowers their log loss
    assert fit_temperature(labels[right], probs[None, right]) == pytest.approx(TEMPERATURE_BOUNDS[0], rel=1e-3)
    with caplog.at_level(logging.WARNING, logger="headstart.calibration"):
        record = calibrate({"val": labels[right]}, {"val": probs[None, right]}, EvaluateParams())
    assert record["decision"] == "at_bound" and record["temperature"] == 1.0
    assert "runs to the bound" in record["reason"] and "T = 1 is kept" in caplog.text
    record = calibrate({"val": labels[:6]}, {"val": probs[None, :6]}, EvaluateParams())
    assert record == {"temperature": 1.0, "fitted": False, "bins": 15, "decision": "too_few_images",
                      "reason": record["reason"]}
    assert "the val split has 6 images, fewer than evaluate.calibration_min_images=50" in record["reason"]
    assert calibrate({"val": labels}, {"val": probs[None]}, EvaluateParams(temperature_scaling=False))["decision"] == "off"
