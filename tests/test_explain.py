"""Grad-CAM on the really trained and exported model: map shapes and ranges, class- and image-dependence,
flip TTA, the evaluate figure and `headstart predict --explain` with its errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from headstart.data.images import load_rgb
from headstart.data.manifest import read_split_manifest
from headstart.explain import GradCam, gradcam_examples, load_explainer, overlay_name
from headstart.layout import Layout
from headstart.model import with_flip_tta
from headstart.serving import keras_runner, load_predictor, serving_model
from tasks import cli, evaluate
from tests.model_fixture import trained_params

pytestmark = pytest.mark.slow  # trains a model through finetune, then runs Grad-CAM

# the fixture's model takes 32 px, where the last conv block is 1x1 (a constant map): the tests of what
# the maps show use a block with a 4x4 map
LAYER = "block_5_add"


def _test_images(layout: Layout) -> tuple[list[np.ndarray], list[str]]:
    """One test image of each class, decoded as predict decodes it, and its label."""
    test = read_split_manifest(layout.split_manifest).query("split == 'test'").drop_duplicates("label")
    return [load_rgb(layout.root / path, target_size=32) for path in test["path"]], list(test["label"])


@pytest.fixture(scope="module")
def explainer(exported_tree) -> GradCam:
    return load_explainer(exported_tree.export_dir / "model.keras", LAYER)


def test_one_map_per_image_of_its_size_in_0_1_and_the_models_probabilities(exported_tree, photos):
    images = [*_test_images(exported_tree)[0], load_rgb(photos["dog"], target_size=32), load_rgb(photos["eagle"])]
    model = exported_tree.export_dir / "model.keras"
    for layer, low_high in ((None, (0.0, 0.0)), (LAYER, (0.0, 1.0))):  # a 1x1 map holds no where: all 0
        maps, probs = load_explainer(model, layer).explain(images)
        assert len(maps) == len(images)
        for image, cam in zip(images, maps, strict=True):
            assert cam.shape == image.shape[:2] and cam.dtype == np.float32
            assert (cam.min(), cam.max()) == pytest.approx(low_high, abs=1e-3)
        np.testing.assert_allclose(probs, load_predictor(model).predict(images), atol=1e-5)


def test_maps_differ_between_target_classes_and_between_images(exported_tree, explainer):
    images, labels = _test_images(exported_tree)
    maps, probs = explainer.explain(images)
    top = probs.argmax(axis=1)
    others, _ = explainer.explain(images, [(best + 1) % probs.shape[1] for best in top])
    for cam, other in zip(maps, others, strict=True):  # another class's evidence lies elsewhere
        assert np.abs(cam - other).mean() > 0.05
    assert len(set(labels)) == len(maps) >= 3
    for i in range(len(maps)):  # a shirt's map is not a coat's: the maps follow the image
        for j in range(i + 1, len(maps)):
            assert np.abs(maps[i] - maps[j]).mean() > 0.02, (labels[i], labels[j])


def test_flip_tta_is_explained_on_both_views(exported_tree):
    """The TTA model sees an image and its mirror alike, so its map of the mirror is the mirrored map."""
    plain = keras.models.load_model(exported_tree.finetune_dir / "model.keras", safe_mode=True, compile=False)
    model = serving_model(with_flip_tta(plain), 32, "bilinear")
    images, _ = _test_images(exported_tree)
    maps, probs = GradCam(model, LAYER).explain(images)
    mirrored, mirrored_probs = GradCam(model, LAYER).explain([image[:, ::-1] for image in images])
    np.testing.assert_allclose(probs, keras_runner(model)(np.stack(images)), atol=1e-5)
    np.testing.assert_allclose(mirrored_probs, probs, atol=1e-5)
    for cam, flipped in zip(maps, mirrored, strict=True):
        np.testing.assert_allclose(flipped[:, ::-1], cam, atol=1e-3)


def test_examples_are_the_mistakes_then_the_most_confident_correct_per_class():
    rows = pd.DataFrame({"path": [f"{i}.png" for i in range(6)], "label": ["a", "a", "a", "b", "b", "b"],
                         "y": [0, 0, 0, 1, 1, 1]})
    probs = np.array([[0.6, 0.4], [0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.45, 0.55], [0.1, 0.9]])
    mistakes = rows.iloc[[2]].assign(predicted=[1], confidence=[0.8])
    examples = gradcam_examples(rows, probs, mistakes, per_class=1)
    assert list(examples["path"]) == ["2.png", "1.png", "5.png"]
    assert list(examples["predicted"]) == [1, 0, 1] and list(examples["confidence"]) == [0.8, 0.9, 0.9]


def test_evaluate_writes_the_gradcam_figure_and_links_it(exported_tree):
    with Image.open(exported_tree.reports_dir / "figures" / "gradcam.png") as image:
        assert image.format == "PNG" and min(image.size) > 200
    assert "(figures/gradcam.png)" in (exported_tree.reports_dir / "evaluation.md").read_text()


def test_gradcam_per_class_0_turns_the_figure_off(trained_tree, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(trained_tree.root, target, ignore=shutil.ignore_patterns("cache", "backbone", "export"))
    layout = Layout(target)
    figure = layout.reports_dir / "figures" / "gradcam.png"
    assert figure.exists()  # from the fixture's own evaluate run
    evaluate.run(trained_params(target, evaluate={"gradcam_per_class": 0}), layout)
    assert not figure.exists() and "gradcam.png" not in (layout.reports_dir / "evaluation.md").read_text()


def test_predict_explain_writes_one_overlay_per_input(exported_tree, photos, tmp_path, capsys):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    shutil.copy(photos["dog"], tmp_path / "in" / "dog.jpg")
    shutil.copy(photos["eagle"], tmp_path / "in" / "sub" / "dog.jpg")  # the same stem in a subfolder
    images, _ = _test_images(exported_tree)
    Image.fromarray(images[0]).save(tmp_path / "garment.png")
    out = tmp_path / "explained"
    status = cli.main(["predict", str(tmp_path / "in"), str(tmp_path / "garment.png"),
                       "--model", str(exported_tree.export_dir / "model.keras"), "--explain", str(out)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert sorted(p.name for p in out.iterdir()) == ["dog-2.png", "dog.png", "garment.png"]
    assert f"wrote 3 Grad-CAM overlays to {out}" in captured.err
    for path in out.iterdir():
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 200


def test_overlay_names_come_from_files_and_urls():
    taken: set[str] = set()
    names = [overlay_name(s, taken) for s in ("a/x.jpg", "b/x.png", "https://host/p/cat%20photo.jpg?size=2", "/")]
    assert names == ["x.png", "x-2.png", "cat_20photo.png", "image.png"]


def _no_conv_model(folder: Path) -> Path:
    """A uint8-in softmax classifier with no convolution: dense layers on the resized pixels."""
    image = keras.Input((None, None, 3), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1 / 255)(image)
    x = keras.layers.Resizing(8, 8)(x)
    x = keras.layers.Flatten()(x)
    model = keras.Model(image, keras.layers.Dense(2, activation="softmax")(x))
    folder.mkdir()
    model.save(folder / "model.keras")
    (folder / "labels.txt").write_text("a\nb\n")
    return folder / "model.keras"


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("model_float32.tflite", "--explain needs the exported Keras model, and {path} is not a Keras model"),
        ("missing/model.keras", "--explain needs the exported Keras model, and {path} does not exist"),
        ("no_conv", "has no convolutional backbone"),
        ("bad_layer", "layer 'no_such_layer' (evaluate.gradcam_layer, --explain-layer) is not a 4-D feature map"),
    ],
)
def test_models_that_cannot_be_explained_exit_2_naming_the_file(exported_tree, photos, tmp_path, capsys, model,
                                                                 message):
    path = {"no_conv": _no_conv_model(tmp_path / "no_conv"), "bad_layer": exported_tree.export_dir / "model.keras"
            }.get(model, exported_tree.export_dir / model)
    layer = ["--explain-layer", "no_such_layer"] if model == "bad_layer" else []
    status = cli.main(["predict", str(photos["dog"]), "--model", str(path), "--explain", str(tmp_path / "out"),
                       *layer])
    error = capsys.readouterr().err
    assert status == 2
    assert message.format(path=path) in error and str(path) in error
    assert not (tmp_path / "out").exists()
