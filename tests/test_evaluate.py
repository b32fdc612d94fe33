"""evaluate stage on a really trained model: numbers cross-checked against scikit-learn, reports, gate."""

from __future__ import annotations

import json
import re
import shutil
import warnings

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
import yaml
from PIL import Image
from scipy.special import softmax
from scipy.stats import binomtest
from sklearn.metrics import classification_report, confusion_matrix, f1_score, log_loss, top_k_accuracy_score

from headstart.calibration import ece_intervals
from headstart.data.datasets import image_dataset
from headstart.layout import Layout
from headstart.metrics import classification_metrics
from headstart.uncertainty import format_interval, read_predictions
from tasks import cli, evaluate
from tests.conftest import REPO_ROOT
from tests.model_fixture import trained_params

pytestmark = pytest.mark.slow  # trains a model through finetune, then evaluates it


def _recomputed(layout: Layout) -> dict[str, dict[str, np.ndarray]]:
    """Predictions made here, independently of the stage: head on cached features, classifier on images."""
    info = json.loads((layout.finetune_dir / "info.json").read_text())
    classes = info["classes"]
    manifest = pd.read_csv(layout.split_manifest)
    head = keras.models.load_model(layout.head_dir / "head.keras", safe_mode=True)
    model = keras.models.load_model(layout.finetune_dir / "model.keras", safe_mode=True)
    out: dict[str, dict[str, np.ndarray]] = {}
    for split in ("test", "val"):
        with np.load(layout.features_dir / f"{split}.npz") as cached:
            features, head_labels = cached["features"], cached["labels"]
        rows = manifest[manifest["split"] == split]
        images = image_dataset([str(layout.root / p) for p in rows["path"]], None, info["image_size"], 8)
        out[split] = {
            "head_probs": head.predict(features, verbose=0), "head_labels": head_labels,
            "probs": model.predict(images, verbose=0), "labels": rows["label"].map(classes.index).to_numpy(),
        }
    return out


def _sklearn_scores(labels: np.ndarray, probs: np.ndarray, k: int) -> dict[str, float]:
    predicted = probs.argmax(1)
    everyone = np.arange(probs.shape[1])
    return {
        "accuracy": float(np.mean(predicted == labels)),
        "top_k_accuracy": top_k_accuracy_score(labels, probs, k=k, labels=everyone),
        "macro_f1": f1_score(labels, predicted, average="macro"),
        "weighted_f1": f1_score(labels, predicted, average="weighted"),
        "log_loss": log_loss(labels, probs / probs.sum(1, keepdims=True), labels=everyone),
    }


@pytest.mark.parametrize(("tree", "decision"), [("exported_tree", "declined"), ("calibrated_tree", "kept")])
def test_metrics_match_sklearn_on_independent_predictions(tree, decision, request):
    """The final model is scored as served: softmax(log p / T) with the temperature evaluate chose. On the
    fine-tuned tree a T fitted on val raises the log loss of val images it was not fitted on, so T = 1; on
    the underconfident head (label smoothing 0.3) it lowers it, so T is kept."""
    layout = request.getfixturevalue(tree)
    metrics = json.loads(layout.metrics_file.read_text())
    k = metrics["top_k"]
    assert k == 3
    record = metrics["calibration"]
    assert record["fitted"] and record["decision"] == decision and record["folds"] == 5
    assert (record["heldout_gain_low"] > 0) == (decision == "kept")
    # declined: scaling would worsen the held-out log loss, not only fail to lower it enough
    assert (record["heldout_log_loss_scaled"] < record["heldout_log_loss_unscaled"]) == (decision == "kept")
    temperature = record["temperature"]
    if decision == "kept":
        assert temperature == record["candidate_temperature"] and temperature < 0.9
        assert metrics["test"]["log_loss"] < metrics["test"]["log_loss_uncalibrated"]  # and it helps on test
    else:
        assert temperature == 1.0 and record["candidate_temperature"] != pytest.approx(1, abs=1e-3)
        assert metrics["test"]["ece"] == metrics["test"]["ece_uncalibrated"]
    for split, predictions in _recomputed(layout).items():
        raw = predictions["probs"].astype(np.float64)
        final = _sklearn_scores(predictions["labels"], softmax(np.log(raw) / temperature, axis=1), k)
        assert metrics[split]["log_loss_uncalibrated"] == pytest.approx(
            _sklearn_scores(predictions["labels"], raw, k)["log_loss"], abs=1e-5)
        head = _sklearn_scores(predictions["head_labels"], predictions["head_probs"], k)
        for key, value in final.items():
            assert metrics[split][key] == pytest.approx(value, abs=1e-5), (split, key)
        for key, value in head.items():
            assert metrics["head"][split][key] == pytest.approx(value, abs=1e-5), ("head", split, key)
        assert metrics[split]["images"] == len(predictions["labels"])


def test_per_class_report_and_confusion_data_match_sklearn(exported_tree):
    classes = json.loads((exported_tree.finetune_dir / "info.json").read_text())["classes"]
    test = _recomputed(exported_tree)["test"]
    predicted = test["probs"].argmax(1)
    expected = classification_report(test["labels"], predicted, labels=range(len(classes)), target_names=classes,
                                     output_dict=True, zero_division=0)
    report = pd.read_csv(exported_tree.reports_dir / "classification_report.csv")
    assert list(report["class"]) == classes
    for name, row in report.set_index("class").iterrows():
        assert row["precision"] == pytest.approx(expected[name]["precision"])
        assert row["recall"] == pytest.approx(expected[name]["recall"])
        assert row["f1"] == pytest.approx(expected[name]["f1-score"])
        assert row["support"] == expected[name]["support"]

    pairs = pd.read_csv(exported_tree.reports_dir / "confusion.csv")
    assert list(pairs.columns) == ["actual", "predicted"]
    matrix = confusion_matrix(pairs["actual"], pairs["predicted"], labels=classes)
    np.testing.assert_array_equal(matrix, confusion_matrix(test["labels"], predicted, labels=range(len(classes))))


def test_figures_and_readable_report(exported_tree):
    figures = exported_tree.reports_dir / "figures"
    for name in ("confusion_matrix.png", "training_curves.png", "misclassified.png", "reliability.png"):
        with Image.open(figures / name) as image:
            assert image.format == "PNG" and min(image.size) > 200, name
    text = (exported_tree.reports_dir / "evaluation.md").read_text()
    metrics = json.loads(exported_tree.metrics_file.read_text())
    assert f"{metrics['test']['accuracy']:.4f}" in text
    classes = json.loads((exported_tree.finetune_dir / "info.json").read_text())["classes"]
    assert all(re.search(rf"^\| {re.escape(name)} +\|", text, re.MULTILINE) for name in classes)
    wrong = round((1 - metrics["test"]["accuracy"]) * metrics["test"]["images"])
    gallery_rows = [line for line in text.split("## Most confident mistakes")[1].splitlines() if line.startswith("| data/")]
    assert len(gallery_rows) == min(wrong, trained_params(exported_tree.root).evaluate.gallery_size)
    calibration = text.split("## Calibration")[1]
    record = metrics["calibration"]
    assert record["reason"] in calibration and "T = 1 kept" in record["reason"]
    assert "scaling does not lower the log loss of images it was not fitted on" in record["reason"]
    assert f"{record['heldout_log_loss_unscaled']:.4f} unscaled and {record['heldout_log_loss_scaled']:.4f}" in calibration
    ece = metrics["test"]["ci95"]["ece"]
    assert f"| test    | {metrics['test']['images']} " in calibration
    assert f"{metrics['test']['ece']:.4f} {format_interval(**ece)}" in calibration
    assert f"{metrics['test']['ece_adaptive']:.4f}" in calibration


def test_reliability_data_is_the_test_split_before_and_after_scaling(exported_tree):
    metrics = json.loads(exported_tree.metrics_file.read_text())
    table = pd.read_csv(exported_tree.reports_dir / "calibration.csv", dtype={"scaling": str}, keep_default_na=False)
    assert list(table.columns) == ["scaling", "bin", "confidence", "accuracy", "count"]
    for scaling, ece_key in (("before", "ece_uncalibrated"), ("after", "ece")):
        rows = table[table["scaling"] == scaling]
        assert rows["count"].sum() == metrics["test"]["images"] and rows["bin"].between(0, 14).all()
        gap = (rows["count"] * (rows["accuracy"] - rows["confidence"]).abs()).sum() / rows["count"].sum()
        assert gap == pytest.approx(metrics["test"][ece_key])


def test_without_a_val_split_the_temperature_stays_one_and_the_report_says_why(tree_copy):
    manifest = pd.read_csv(tree_copy.split_manifest, dtype=str, keep_default_na=False)
    manifest.loc[manifest["split"] == "val", "split"] = "train"
    manifest.to_csv(tree_copy.split_manifest, index=False)
    metrics = evaluate.run(_params(tree_copy), tree_copy)
    assert metrics["calibration"]["temperature"] == 1.0 and not metrics["calibration"]["fitted"]
    assert metrics["calibration"]["decision"] == "no_val" and "val" not in metrics
    assert metrics["test"]["ece"] == metrics["test"]["ece_uncalibrated"]
    assert metrics["test"]["log_loss"] == pytest.approx(metrics["test"]["log_loss_uncalibrated"])
    assert "there is no val split to fit it on" in (tree_copy.reports_dir / "evaluation.md").read_text()


def test_intervals_around_the_final_model_scores(exported_tree):
    metrics = json.loads(exported_tree.metrics_file.read_text())
    text = (exported_tree.reports_dir / "evaluation.md").read_text()
    for split in ("test", "val"):
        for key in ("accuracy", "macro_f1"):
            interval = metrics[split]["ci95"][key]
            assert 0 <= interval["low"] <= metrics[split][key] <= interval["high"] <= 1, (split, key)
            assert interval["low"] < interval["high"], (split, key)  # 0.9-ish accuracy on ~20 images is not certain
            assert format_interval(**interval) in text
    assert all("ci95" not in scores for scores in metrics["head"].values())  # the final model only
    recomputed = _recomputed(exported_tree)
    p = trained_params(exported_tree.root).evaluate
    for split in ("test", "val"):  # the ECE's intervals: the bootstrap of the served probabilities' ECE
        served = softmax(np.log(recomputed[split]["probs"].astype(np.float64)) / metrics["calibration"]["temperature"], 1)
        expected = ece_intervals(recomputed[split]["labels"], served, p.calibration_bins, p.bootstrap_resamples,
                                 p.bootstrap_seed)
        for key in ("ece", "ece_adaptive"):
            interval = metrics[split]["ci95"][key]
            assert interval == pytest.approx(expected[key], abs=1e-5) and interval["low"] < interval["high"]
    report = pd.read_csv(exported_tree.reports_dir / "classification_report.csv", dtype={"class": str})
    test = recomputed["test"]
    predicted = softmax(np.log(test["probs"].astype(np.float64)) / metrics["calibration"]["temperature"], 1).argmax(1)
    for i, row in report.iterrows():  # Wilson score intervals from the counts, as statsmodels/scipy define them
        hits = int(((test["labels"] == i) & (predicted == i)).sum())
        for name, trials in (("recall", (test["labels"] == i).sum()), ("precision", (predicted == i).sum())):
            if trials:
                expected = binomtest(hits, int(trials)).proportion_ci(0.95, method="wilson")
                assert (row[f"{name}_low"], row[f"{name}_high"]) == pytest.approx(tuple(expected)), (row["class"], name)
                assert row[f"{name}_low"] <= row[name] <= row[f"{name}_high"]
    assert "| recall_low" in text.split("## Per class")[1]


def test_finetune_gain_pairs_head_and_final_on_the_same_test_images(exported_tree):
    metrics = json.loads(exported_tree.metrics_file.read_text())
    gain, test = metrics["finetune_gain"], _recomputed(exported_tree)["test"]
    head_right = test["head_probs"].argmax(1) == test["head_labels"]
    final_right = test["probs"].argmax(1) == test["labels"]  # temperature scaling keeps the argmax
    b, c = int((head_right & ~final_right).sum()), int((~head_right & final_right).sum())
    assert (gain["head_only_right"], gain["final_only_right"], gain["images"]) == (b, c, len(final_right))
    assert gain["delta"] == pytest.approx(metrics["test"]["accuracy"] - metrics["head"]["test"]["accuracy"])
    assert gain["low"] <= gain["delta"] <= gain["high"]
    assert gain["p_value"] == pytest.approx(binomtest(c, b + c, 0.5).pvalue if b + c else 1.0)
    text = (exported_tree.reports_dir / "evaluation.md").read_text()
    assert "## Did fine-tuning pay?" in text and f"p = {gain['p_value']:.3g}" in text


def test_a_gain_within_noise_is_called_so_in_words():
    def verdict(delta: float, p_value: float) -> str:
        gain = {"delta": delta, "low": delta - 0.02, "high": delta + 0.02, "p_value": p_value, "images": 90,
                "head_only_right": 3, "final_only_right": 4}
        return " ".join(evaluate._gain_lines({"finetune_gain": gain}))

    assert "within noise" in verdict(0.011, 0.7) and "+1.10 points" in verdict(0.011, 0.7)
    assert "gain is real" in verdict(0.05, 0.001) and "loss is real" in verdict(-0.05, 0.001)
    assert evaluate._gain_lines({}) == []


def test_per_image_test_predictions(exported_tree):
    found = read_predictions(exported_tree.predictions_file)
    test = _recomputed(exported_tree)["test"]
    temperature = json.loads(exported_tree.metrics_file.read_text())["calibration"]["temperature"]
    served = softmax(np.log(test["probs"].astype(np.float64)) / temperature, axis=1)  # the calibrated model's
    manifest = pd.read_csv(exported_tree.split_manifest, dtype=str, keep_default_na=False)
    rows = manifest[manifest["split"] == "test"]
    assert found.classes == json.loads((exported_tree.finetune_dir / "info.json").read_text())["classes"]
    assert list(found.frame["path"]) == list(rows["path"]) and list(found.frame["label"]) == list(rows["label"])
    assert list(found.frame["predicted"]) == [found.classes[i] for i in served.argmax(1)]
    np.testing.assert_allclose(found.probabilities, served, atol=1e-5)
    np.testing.assert_allclose(found.frame["confidence"], served.max(1), atol=1e-5)
    outs = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]["evaluate"]["outs"]
    assert {"reports/predictions.csv": {"cache": False}} in outs  # in git, for the PR report's paired test


@pytest.fixture
def tree_copy(trained_tree, tmp_path) -> Layout:
    """A private copy of the trained tree that a test may damage."""
    target = tmp_path / "copy"
    shutil.copytree(trained_tree.root, target, ignore=shutil.ignore_patterns("cache", "backbone", "export"))
    return Layout(target)


def test_quality_gate_fails_the_stage_with_a_clear_message(exported_tree, tree_copy, tmp_path, capsys):
    accuracy = json.loads(exported_tree.metrics_file.read_text())["test"]["accuracy"]
    assert accuracy < 1.0  # the fixture's confusable classes keep a failing threshold possible
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(trained_params(tree_copy.root).model_dump(mode="json")))
    args = ["evaluate", "--params", str(params_file), "--root", str(tree_copy.root)]
    assert cli.main([*args, "--set", f"evaluate.assert_min_accuracy={accuracy}"]) == 0
    assert cli.main([*args, "--set", f"evaluate.assert_min_accuracy={accuracy + 0.001:.6f}"]) == 2
    error = capsys.readouterr().err
    assert f"test accuracy {accuracy:.4f} is below evaluate.assert_min_accuracy=" in error
    assert "FAILED" in (tree_copy.reports_dir / "evaluation.md").read_text()


def _params(layout: Layout):
    return trained_params(layout.root)


def test_bootstrap_off_drops_the_intervals(tree_copy):
    params = _params(tree_copy)
    evaluate.run(params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"bootstrap_resamples": 0})}),
                 tree_copy)
    metrics = json.loads(tree_copy.metrics_file.read_text())
    assert "ci95" not in metrics["test"] and "ci95" not in metrics["val"] and "finetune_gain" not in metrics
    report = pd.read_csv(tree_copy.reports_dir / "classification_report.csv")  # Wilson intervals need no resampling
    assert {"recall_low", "recall_high", "precision_low", "precision_high"} <= set(report.columns)
    assert "95% CI" not in (tree_copy.reports_dir / "evaluation.md").read_text()


def test_missing_model_names_the_stage_to_run(tree_copy):
    (tree_copy.finetune_dir / "model.keras").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.keras not found: run `headstart finetune` first"):
        evaluate.run(_params(tree_copy), tree_copy)


def test_class_list_mismatch_is_refused(tree_copy):
    info_path = tree_copy.finetune_dir / "info.json"
    info = json.loads(info_path.read_text())
    info["classes"] = info["classes"][::-1]
    info_path.write_text(json.dumps(info))
    with pytest.raises(evaluate.EvaluateError, match="rerun train_head and finetune"):
        evaluate.run(_params(tree_copy), tree_copy)


def test_manifest_label_unknown_to_the_model_is_refused(tree_copy):
    manifest = pd.read_csv(tree_copy.split_manifest)
    manifest.loc[0, "label"] = "sock"
    manifest.to_csv(tree_copy.split_manifest, index=False)
    with pytest.raises(evaluate.EvaluateError, match=r"labels \['sock'\] that the model does not know"):
        evaluate.run(_params(tree_copy), tree_copy)


def test_stale_features_are_refused(tree_copy):
    manifest = pd.read_csv(tree_copy.split_manifest)
    test_rows = manifest.index[manifest["split"] == "test"]
    manifest.loc[test_rows[0], "split"] = "train"
    manifest.to_csv(tree_copy.split_manifest, index=False)
    with pytest.raises(evaluate.EvaluateError, match=r"test\.npz does not hold the test split"):
        evaluate.run(_params(tree_copy), tree_copy)


def test_empty_test_split_is_refused(tree_copy):
    manifest = pd.read_csv(tree_copy.split_manifest)
    manifest.loc[manifest["split"] == "test", "split"] = "train"
    manifest.to_csv(tree_copy.split_manifest, index=False)
    with pytest.raises(evaluate.EvaluateError, match=r"no test images: set split\.test > 0"):
        evaluate.run(_params(tree_copy), tree_copy)


def test_two_classes_get_metrics_instead_of_a_scikit_learn_error():
    """scikit-learn refuses binary targets with two-column scores; top-k must still mean "class in the k best"."""
    rng = np.random.default_rng(0)
    first = rng.uniform(size=200)
    probs = np.stack([first, 1 - first], axis=1).astype(np.float32)
    labels = rng.integers(0, 2, size=200)
    top1 = classification_metrics(labels, probs, top_k=1)
    assert top1["top_k_accuracy"] == pytest.approx(top1["accuracy"])
    # the same scores with an empty third class go through scikit-learn's multiclass path
    padded = np.concatenate([probs, np.zeros((200, 1), np.float32)], axis=1)
    assert top1["top_k_accuracy"] == pytest.approx(top_k_accuracy_score(labels, padded, k=1, labels=range(3)))
    assert classification_metrics(labels, probs, top_k=3)["top_k_accuracy"] == 1.0
    assert classification_metrics(labels, probs, top_k=3)["accuracy"] == top1["accuracy"] < 1.0


def test_pytest_drops_the_known_keras_warning_but_not_the_same_warning_from_elsewhere():
    """pyproject.toml's filterwarnings: thousands of these from Keras' backend hid every other warning."""
    variable = tf.Variable([1.0, 2.0])
    with warnings.catch_warnings(record=True) as caught:  # keeps the filters pytest applied for this test
        keras.ops.convert_to_numpy(variable)  # np.array(variable) inside Keras: filtered
        np.array(variable)  # the same conversion written here: still reported
    messages = [(w.filename, str(w.message)) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert len(messages) == 1 and messages[0][0] == __file__, messages
    assert "__array__ implementation doesn't accept a copy keyword" in messages[0][1]
