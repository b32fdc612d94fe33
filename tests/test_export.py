"""export stage: round trips of every format on the really trained model, parity, model card."""

from __future__ import annotations

import json
import re
import shutil

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
from keras import layers
from scipy.special import softmax
from sklearn.metrics import log_loss

from headstart.data.datasets import image_dataset
from headstart.data.images import load_rgb
from headstart.layout import Layout
from headstart.model import all_layers
from headstart.params import ParamsError, validate_params
from headstart.runtimes import available
from headstart.serving import load_predictor
from tasks import export
from tests.model_fixture import calibrated_params, trained_params

pytestmark = pytest.mark.slow  # trains and exports a model


def _classes(layout: Layout) -> list[str]:
    return json.loads((layout.finetune_dir / "info.json").read_text())["classes"]


def test_every_format_written_and_float_formats_agree(exported_tree):
    out = exported_tree.export_dir
    for fmt, name in export.FILES.items():
        assert (out / name).exists() or not available(export.RUNTIME_OF.get(fmt, "tensorflow")), name
    assert (out / "labels.txt").read_text().split() == _classes(exported_tree)
    parity = json.loads((exported_tree.reports_dir / "export_parity.json").read_text())
    test_images = int((pd.read_csv(exported_tree.split_manifest)["split"] == "test").sum())
    assert parity["images"] == test_images
    for fmt in export.FLOAT_FORMATS:
        if fmt in parity:
            assert parity[fmt]["agreement"] >= 0.99, fmt
            assert parity[fmt]["max_abs_prob_diff"] < (1e-4 if fmt in export.RUNTIME_OF else 0.02), fmt
    int8 = parity["tflite_int8"]
    # images on which int8 agrees with the reference are right or wrong in both: accuracies differ by at most
    # the disagreeing share; a broken quantisation would agree no better than chance
    assert abs(int8["accuracy"] - parity["reference"]["accuracy"]) <= 1 - int8["agreement"] + 1e-9
    assert int8["agreement"] > 1 / len(_classes(exported_tree))
    assert int8["accuracy_drop"] == pytest.approx(parity["reference"]["accuracy"] - int8["accuracy"])
    # the exported model is the evaluated model: same test accuracy through both pipelines
    metrics = json.loads(exported_tree.metrics_file.read_text())
    assert parity["reference"]["accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    sizes = {fmt: parity[fmt]["bytes"] for fmt in ("tflite_float32", "tflite_float16", "tflite_int8")}
    assert sizes["tflite_int8"] < sizes["tflite_float16"] < sizes["tflite_float32"]


def test_keras_export_is_safe_mode_loadable_and_serves_the_calibrated_training_pipeline(calibrated_tree):
    """The export carries the temperature evaluate kept: softmax(log p / T) of the classifier's p."""
    exported_tree = calibrated_tree
    model = keras.models.load_model(exported_tree.export_dir / "model.keras", safe_mode=True)
    assert not [layer for layer in all_layers(model) if isinstance(layer, layers.Lambda)]
    assert model.inputs[0].dtype == "uint8" and tuple(model.inputs[0].shape) == (None, None, None, 3)
    info = json.loads((exported_tree.finetune_dir / "info.json").read_text())
    manifest = pd.read_csv(exported_tree.split_manifest)
    paths = [str(exported_tree.root / p) for p in manifest["path"][:8]]
    raw = np.stack([load_rgb(p) for p in paths])  # 28x28 uint8: the model resizes inside
    classifier = keras.models.load_model(exported_tree.finetune_dir / "model.keras", safe_mode=True)
    uncalibrated = classifier.predict(image_dataset(paths, None, info["image_size"], 8, info["interpolation"]),
                                      verbose=0)
    record = json.loads(exported_tree.metrics_file.read_text())["calibration"]
    temperature = record["temperature"]
    assert record["decision"] == "kept" and temperature != pytest.approx(1, abs=1e-3)
    card = json.loads((exported_tree.export_dir / "model_card.json").read_text())
    assert card["calibration"] == record and record["reason"] in card["output"]["meaning"]
    assert f"Temperature T = {temperature:.4f} kept" in record["reason"]
    expected = softmax(np.log(uncalibrated.astype(np.float64)) / temperature, axis=1)
    np.testing.assert_allclose(model.predict(raw, verbose=0), expected, atol=1e-5)
    # called directly, without training=False, it serves the same (BatchNorm on its moving statistics)
    np.testing.assert_allclose(np.asarray(model(raw)), expected, atol=1e-5)
    assert np.abs(expected - uncalibrated).max() > 1e-3  # the check would notice a missing temperature


def test_saved_model_has_the_named_serving_signature(exported_tree):
    loaded = tf.saved_model.load(str(exported_tree.export_dir / "saved_model"))
    signature = loaded.signatures["serving_default"]
    spec = signature.structured_input_signature[1]["image"]
    assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, None, None, 3]
    image = load_rgb(exported_tree.root / pd.read_csv(exported_tree.split_manifest)["path"][0])
    big = tf.image.resize(image[None], (300, 200)).numpy().astype(np.uint8)  # any size goes in
    probs = signature(image=tf.constant(big))["probabilities"].numpy()
    assert probs.shape == (1, len(_classes(exported_tree))) and probs.sum() == pytest.approx(1, abs=1e-4)


def test_int8_tflite_is_integer_inside(exported_tree):
    interpreter = Interpreter(model_path=str(exported_tree.export_dir / "model_int8.tflite"))
    source, = interpreter.get_input_details()
    target, = interpreter.get_output_details()
    assert source["dtype"] == np.uint8 and list(source["shape_signature"]) == [-1, -1, -1, 3]
    assert target["dtype"] == np.uint8
    kinds = [detail["dtype"] for detail in interpreter.get_tensor_details()]
    assert sum(k == np.int8 for k in kinds) > len(kinds) / 2


def test_model_card_describes_the_model(exported_tree):
    card = json.loads((exported_tree.export_dir / "model_card.json").read_text())
    info = json.loads((exported_tree.finetune_dir / "info.json").read_text())
    assert card["classes"] == info["classes"]
    assert (card["backbone"], card["weights_id"]) == (info["backbone"], info["weights_id"])
    assert card["input"]["dtype"] == "uint8" and card["input"]["resized_inside_to"] == [info["image_size"]] * 2
    assert card["serving_signature"] == "serving_default"
    assert card["calibration"] == json.loads(exported_tree.metrics_file.read_text())["calibration"]
    assert f"{card['calibration']['temperature']:.4f}" in card["output"]["meaning"]
    assert "(T = 1 kept: " in card["output"]["meaning"]  # and why: scaling did not help on held-out val images
    assert card["metrics"]["test"]["accuracy"] == json.loads(exported_tree.metrics_file.read_text())["test"]["accuracy"]
    assert card["parity"]["tflite_int8"]["agreement"] == pytest.approx(
        json.loads((exported_tree.reports_dir / "export_parity.json").read_text())["tflite_int8"]["agreement"])
    assert card["params"]["export"]["min_float_agreement"] == 0.99
    assert len(card["data"]["split_manifest_sha256"]) == 64 and len(card["source_model_sha256"]) == 64
    assert {"tasks/export.py", "headstart/serving.py", "headstart/data/datasets.py"} <= set(card["code"])
    assert card["versions"]["tensorflow"] == tf.__version__
    for fmt, entry in card["files"].items():
        assert (exported_tree.export_dir / entry["path"]).exists(), fmt


def test_disagreeing_float_format_fails_with_a_clear_message(exported_tree, tmp_path):
    """The int8 model posing as float32 disagrees on some test images: the check must refuse it."""
    parity_json = json.loads((exported_tree.reports_dir / "export_parity.json").read_text())
    assert parity_json["tflite_int8"]["agreement"] < 1.0
    impostor = tmp_path / "model_float32.tflite"
    shutil.copy(exported_tree.export_dir / "model_int8.tflite", impostor)
    shutil.copy(exported_tree.export_dir / "labels.txt", tmp_path / "labels.txt")
    classes = _classes(exported_tree)
    test = pd.read_csv(exported_tree.split_manifest).query("split == 'test'")
    images = [load_rgb(exported_tree.root / p) for p in test["path"]]
    labels = test["label"].map(classes.index).to_numpy()
    reference = export._predict_all(load_predictor(exported_tree.export_dir / "model.keras"), images)
    parity = export.parity_check(reference, {"tflite_float32": impostor}, images, labels)
    assert parity["tflite_float32"]["agreement"] == pytest.approx(parity_json["tflite_int8"]["agreement"])
    expected = r"tflite_float32 top-1 agreement 0\.\d+ < export\.min_float_agreement=0\.99"
    with pytest.raises(export.ExportParityError, match=expected):
        export.check_float_agreement(parity, 0.99, tmp_path / "export_parity.json")


def test_missing_classifier_names_the_stage_to_run(tmp_path):
    layout = Layout(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"info\.json not found: run `headstart finetune` first"):
        export.run(trained_params(tmp_path), layout)


def test_subset_of_formats(exported_tree, tmp_path):
    """Only .keras and float32 TFLite: the SavedModel used for conversion stays out of the export."""
    target = tmp_path / "copy"
    shutil.copytree(exported_tree.root, target, ignore=shutil.ignore_patterns("cache", "backbone", "export"))
    layout = Layout(target)
    parity = export.run(trained_params(target, export={"formats": ["keras", "tflite_float32"]}), layout)
    assert sorted(p.name for p in layout.export_dir.iterdir()) == [
        "labels.txt", "model.keras", "model_card.json", "model_float32.tflite"]
    assert parity["tflite_float32"]["agreement"] >= 0.99
    assert not list(target.glob(".export.*"))


def test_flip_tta_is_evaluated_exported_and_exact(calibrated_tree, tmp_path):
    """evaluate.tta_flip: evaluate reports both numbers, export serves the averaged model, parity holds."""
    from headstart.model import with_flip_tta
    from tasks import evaluate

    target = tmp_path / "tta"
    shutil.copytree(calibrated_tree.root, target, ignore=shutil.ignore_patterns("cache", "backbone", "export"))
    (target / "data" / "backbone").symlink_to(calibrated_tree.backbone_dir, target_is_directory=True)
    layout = Layout(target)
    converted = ["openvino"] if available("openvino") else []  # the mirror converts too
    params = calibrated_params(target, evaluate={"tta_flip": True},
                               export={"formats": ["keras", "tflite_float32", *converted]})
    metrics = evaluate.run(params, layout)
    parity = export.run(params, layout)

    assert metrics["tta_flip"] and set(metrics["without_tta"]) == set(metrics["head"]) >= {"test"}
    assert "final without flip TTA" in (layout.reports_dir / "evaluation.md").read_text()
    assert parity["reference"]["accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert parity["tflite_float32"]["agreement"] >= 0.99
    for fmt in converted:
        assert parity[fmt]["agreement"] == 1.0 and parity[fmt]["max_abs_prob_diff"] < 1e-4, fmt
    assert json.loads((layout.export_dir / "model_card.json").read_text())["tta_flip"] is True

    classifier = keras.models.load_model(layout.finetune_dir / "model.keras", safe_mode=True)
    images = np.random.default_rng(0).uniform(0, 255, (4, *classifier.input_shape[1:])).astype("float32")
    expected = (classifier.predict(images, verbose=0) + classifier.predict(images[:, :, ::-1], verbose=0)) / 2
    np.testing.assert_allclose(with_flip_tta(classifier).predict(images, verbose=0), expected, atol=1e-6)
    exported = keras.models.load_model(layout.export_dir / "model.keras", safe_mode=True)
    assert any(layer.name == "flip_tta_mean" for layer in all_layers(exported))

    # served = the mean of each pass's softmax(log p / T), with the T evaluate fitted on exactly that
    test = pd.read_csv(layout.split_manifest, dtype=str, keep_default_na=False).query("split == 'test'")
    paths = [str(target / p) for p in test["path"]]
    info = json.loads((layout.finetune_dir / "info.json").read_text())
    resized = np.concatenate(list(image_dataset(paths, None, info["image_size"], 64).as_numpy_iterator()))
    passes = np.stack([classifier.predict(resized, verbose=0), classifier.predict(resized[:, :, ::-1], verbose=0)])
    temperature = metrics["calibration"]["temperature"]
    assert metrics["calibration"]["decision"] == "kept" and temperature != pytest.approx(1, abs=1e-3)
    served = exported.predict(np.stack([load_rgb(p) for p in paths]), verbose=0)
    np.testing.assert_allclose(served, softmax(np.log(passes.astype(np.float64)) / temperature, axis=-1).mean(0),
                               atol=1e-5)
    labels = test["label"].map(info["classes"].index).to_numpy()
    assert log_loss(labels, served / served.sum(1, keepdims=True), labels=range(len(info["classes"]))) == \
        pytest.approx(metrics["test"]["log_loss"], abs=1e-5)


@pytest.mark.parametrize(
    ("formats", "message"),
    [([], "export.formats' has value []"), (["keras", "coreml"], "export.formats.1' has value 'coreml'")],
)
def test_bad_export_formats_are_named(formats, message):
    with pytest.raises(ParamsError, match=re.escape(message)):
        validate_params({"export": {"formats": formats}})
