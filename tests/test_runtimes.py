"""The inference runtimes: resolution and fallback, parity with TensorFlow on real images, the bf16 cache
namespace, the ONNX/OpenVINO exports and predict on them without TensorFlow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from headstart import runtimes
from headstart.params import ParamsError, validate_params
from tests.conftest import REPO_ROOT

needs_openvino = pytest.mark.skipif(not runtimes.available("openvino"), reason="OpenVINO is not installed")
needs_onnxruntime = pytest.mark.skipif(not runtimes.available("onnxruntime"), reason="ONNX Runtime is not installed")
FAST = [r for r in ("openvino", "onnxruntime") if runtimes.available(r)]


@pytest.fixture
def without_openvino(monkeypatch):
    """OpenVINO as if not installed: its import raises ImportError, as Python does for a missing package."""
    for name in [m for m in sys.modules if m == "openvino" or m.startswith("openvino.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "openvino", None)


def test_auto_takes_openvino_where_installed_and_tensorflow_without_it(without_openvino):
    assert not runtimes.available("openvino")
    assert runtimes.resolve("auto") == "tensorflow"
    with pytest.raises(runtimes.RuntimeUnavailable, match=r"features\.runtime: openvino is not installed: pip install"):
        runtimes.resolve("openvino", key="features.runtime")
    with pytest.raises(runtimes.RuntimeUnavailable, match="auto with precision bf16 needs OpenVINO"):
        runtimes.resolve("auto", "bf16")


@needs_openvino
def test_auto_is_openvino_on_a_cpu_and_tensorflow_on_a_gpu():
    assert runtimes.resolve("auto") == "openvino"
    assert runtimes.resolve("auto", gpu=True) == "tensorflow"
    assert runtimes.resolve("auto", "bf16", gpu=True) == "openvino"


@pytest.mark.parametrize(("section", "values", "message"), [
    ("features", {"precision": "bf16", "runtime": "tensorflow"}, "precision bf16 runs on OpenVINO only"),
    ("features", {"runtime": "tvm"}, "features.runtime' has value 'tvm'"),
    ("evaluate", {"runtime": "openvino_bf16"}, "evaluate.runtime' has value 'openvino_bf16'"),
])
def test_bad_runtime_settings_are_named(section, values, message):
    with pytest.raises(ParamsError, match=message):
        validate_params({section: values})


def _fashion_batch(fashion_arrays, size: int) -> np.ndarray:
    """32 real Fashion-MNIST images as the features stage feeds them: RGB float32 0..255, resized."""
    import tensorflow as tf

    images = np.repeat(fashion_arrays[0][:32, ..., None], 3, axis=-1).astype(np.float32)
    return tf.image.resize(images, (size, size)).numpy()


@pytest.fixture(scope="module")
def extractor(tmp_path_factory):
    from headstart.backbones.loading import build_feature_extractor, load_backbone

    backbone = load_backbone("mobilenet_v2_tv", "packaged", 64, tmp_path_factory.mktemp("backbone"))
    return build_feature_extractor(backbone)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", FAST)
def test_runtimes_agree_with_tensorflow_on_real_images(extractor, fashion_arrays, runtime):
    from headstart.conversion import runner

    batch = _fashion_batch(fashion_arrays, 64)
    reference = runner(extractor, [None, 64, 64, 3], "tensorflow")(batch)[0]
    run = runner(extractor, [None, 64, 64, 3], runtime, what="features")
    (features,) = run(batch)
    assert run.parity is not None and run.parity < 1e-4
    assert features.shape == reference.shape == (32, 1280)
    assert np.abs(features - reference).max() < 1e-4 * np.abs(reference).max()


@pytest.mark.slow
@needs_openvino
@pytest.mark.skipif("avx512_bf16" not in Path("/proc/cpuinfo").read_text(), reason="no bf16 on this CPU")
def test_openvino_runs_f32_only_when_told_and_bf16_stays_within_its_tolerance(extractor, fashion_arrays):
    """On this CPU OpenVINO defaults to bf16: the f32 hint is what keeps the first test exact."""
    from headstart.conversion import runner

    batch = _fashion_batch(fashion_arrays, 64)
    run = runner(extractor, [None, 64, 64, 3], "openvino", "bf16", "features")
    run(batch)
    assert runtimes.TOLERANCE["f32"] < run.parity < runtimes.TOLERANCE["bf16"]


@pytest.mark.slow
@needs_openvino
def test_a_wrong_conversion_fails_the_first_batch_loudly(extractor, fashion_arrays):
    """The base without its preprocessing posing as the feature extractor: the check refuses it."""
    import keras

    from headstart.conversion import CheckedRunner, runner

    image = keras.Input((64, 64, 3))
    base_only = keras.Model(image, extractor.layers[3](extractor.layers[2](image)))  # no preprocessing layer
    wrong = runner(base_only, [None, 64, 64, 3], "openvino").runner
    reference = runner(extractor, [None, 64, 64, 3], "tensorflow")
    checked = CheckedRunner(wrong, reference, "openvino", "f32", "features")
    with pytest.raises(runtimes.RuntimeParityError, match=r"features: openvino \(f32\) differs from TensorFlow by"):
        checked(_fashion_batch(fashion_arrays, 64))


@pytest.mark.slow
@needs_openvino
def test_bf16_features_never_mix_with_f32_ones(tmp_path, fashion_arrays):
    """f32 vectors from any runtime share the cache; bf16 ones are computed into a namespace of their own."""
    from headstart.layout import Layout
    from tasks import features
    from tests.stage_inputs import build_feature_tree, make_params

    root = build_feature_tree(tmp_path / "tree", *fashion_arrays)
    layout = Layout(root)
    for runtime in ("tensorflow", "openvino"):  # the tree was built on auto (OpenVINO)
        f32 = features.run(make_params(root, features={"runtime": runtime}), layout)
        assert (f32["computed"], f32["runtime"]) == (0, f"{runtime} f32")
    with np.load(layout.features_dir / "train.npz") as data:
        f32_features = data["features"]
    bf16 = features.run(make_params(root, features={"runtime": "auto", "precision": "bf16"}), layout)
    assert bf16["reused"] == 0 and bf16["computed"] > 0 and bf16["runtime"] == "openvino bf16"
    info = json.loads((layout.features_dir / "info.json").read_text())
    assert info["cache_id"].endswith("|bf16")
    assert len(list(layout.feature_cache_dir.iterdir())) == 2
    with np.load(layout.features_dir / "train.npz") as data:
        assert not np.array_equal(data["features"], f32_features)
        np.testing.assert_allclose(data["features"], f32_features, atol=0.5 * np.abs(f32_features).max())


@pytest.mark.slow
def test_features_fall_back_to_tensorflow_without_openvino(tmp_path, fashion_arrays, without_openvino):
    from headstart.layout import Layout
    from tasks import features
    from tests.stage_inputs import build_feature_tree, make_params

    root = build_feature_tree(tmp_path / "tree", *fashion_arrays)
    stats = features.run(make_params(root, features={"image_size": 40}), Layout(root))
    assert stats["runtime"] == "tensorflow f32" and stats["computed"] > 0


# ---------------------------------------------------------------- exported formats


@pytest.mark.slow
@needs_onnxruntime
def test_onnx_export_takes_only_the_image(exported_tree):
    """The Normalization constants tf2onnx left as graph inputs are baked in: one uint8 input of any size."""
    import onnx

    model = onnx.load(str(exported_tree.export_dir / "model.onnx"))
    (image,) = model.graph.input
    dims = [d.dim_value or None for d in image.type.tensor_type.shape.dim]
    assert image.name == "image" and image.type.tensor_type.elem_type == onnx.TensorProto.UINT8 and dims[1:3] == [None] * 2
    assert [o.name for o in model.graph.output] == ["probabilities"]


@pytest.mark.slow
@needs_openvino
def test_export_without_openvino_names_the_format_and_the_package(exported_tree, without_openvino):
    from tasks import export
    from tests.model_fixture import trained_params

    with pytest.raises(runtimes.RuntimeUnavailable, match=r"export\.formats: openvino needs openvino \(pip install"):
        export.run(trained_params(exported_tree.root, export={"formats": ["keras", "openvino"]}), exported_tree)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["model.onnx", "model.xml", "model.keras"])
def test_predict_on_onnx_and_openvino_never_imports_tensorflow(exported_tree, photos, model):
    """`headstart predict` on a real photo: the ONNX and OpenVINO files (and model.keras, through its OpenVINO
    twin) give the Keras model's probabilities without TensorFlow in the process."""
    if model != "model.keras" and not runtimes.available(runtimes.RUNTIMES[1 + (model == "model.onnx")]):
        pytest.skip("runtime not installed")
    if model == "model.keras" and not runtimes.available("openvino"):
        pytest.skip("OpenVINO is not installed")
    code = ("import sys, tasks.cli as c; status = c.main(sys.argv[1:]); "
            "assert 'tensorflow' not in sys.modules, 'imported tensorflow'; sys.exit(status)")
    photo = str(photos["eagle"])
    done = subprocess.run([sys.executable, "-c", code, "predict", photo, "--format", "jsonl", "--top-k", "4",
                           "--model", str(exported_tree.export_dir / model)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    probs = {p["label"]: p["probability"] for p in json.loads(done.stdout)["predictions"]}

    from headstart.data.images import load_rgb
    from headstart.serving import load_predictor

    keras_model = load_predictor(exported_tree.export_dir / "model.keras")  # runtime tensorflow
    assert keras_model.kind == "keras"
    expected = keras_model.predict([load_rgb(photo, target_size=keras_model.image_size)])[0]
    np.testing.assert_allclose([probs[c] for c in keras_model.classes], expected, atol=2e-5)


@needs_openvino
def test_runtime_flag_names_what_cannot_run(exported_tree, tmp_path):
    from headstart.serving import ModelFormatError, load_predictor

    assert load_predictor(exported_tree.export_dir / "model.keras", runtime="onnxruntime").kind == "onnx"
    with pytest.raises(ModelFormatError, match="--runtime openvino cannot run this file"):
        load_predictor(exported_tree.export_dir / "model.onnx", runtime="openvino")
    lone = tmp_path / "model.keras"
    lone.symlink_to(exported_tree.export_dir / "model.keras")
    (tmp_path / "labels.txt").write_text((exported_tree.export_dir / "labels.txt").read_text())
    assert load_predictor(lone, runtime="auto").kind == "keras"  # no twin beside it: TensorFlow
    with pytest.raises(FileNotFoundError, match="--runtime openvino: no model.xml beside"):
        load_predictor(lone, runtime="openvino")


# ---------------------------------------------------------------- the kept conversion and the static batch


@pytest.mark.slow
@pytest.mark.parametrize("runtime", FAST)
def test_the_conversion_is_kept_reused_and_converted_again_when_damaged(extractor, fashion_arrays, tmp_path, runtime,
                                                                       caplog):
    """The features stage's conversion on disk: reused while intact, a truncated or edited file converted again."""
    import tensorflow as tf

    from headstart.conversion import CHECKSUMS, cached_conversion, runner, traced

    function = traced(extractor, tf.TensorSpec([None, 64, 64, 3], tf.float32, name="image"))
    first = cached_conversion(function, runtime, tmp_path, "backbone-a")
    stamp = first.stat().st_mtime_ns
    with caplog.at_level("INFO", logger="headstart.conversion"):
        assert cached_conversion(function, runtime, tmp_path, "backbone-a") == first
    assert first.stat().st_mtime_ns == stamp and "reusing" in caplog.text
    assert cached_conversion(function, runtime, tmp_path, "backbone-b").parent != first.parent  # another key

    weights = first.with_suffix(".bin") if runtime == "openvino" else first
    for damage in ("truncate", "checksums"):
        if damage == "truncate":
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        else:
            (first.parent / CHECKSUMS).write_text("{not json")
        caplog.clear()
        with caplog.at_level("WARNING", logger="headstart.conversion"):
            again = cached_conversion(function, runtime, tmp_path, "backbone-a")
        assert again == first and "converting again" in caplog.text
    from headstart.backbones.loading import build_feature_extractor, load_backbone

    # the same name with other weights (weights: none draws new ones each build) is another conversion
    random = build_feature_extractor(load_backbone("mobilenet_v2_tv", "none", 64, tmp_path / "backbone"))
    for model in (extractor, random):
        run = runner(model, [None, 64, 64, 3], runtime, what="features", cache=(tmp_path, "backbone-a"))
        run(_fashion_batch(fashion_arrays, 64))
        assert run.parity is not None and run.parity < runtimes.TOLERANCE["f32"]
    assert not list(tmp_path.glob(".*tmp-*"))  # no staging folder left behind


@pytest.mark.slow
@needs_openvino
def test_a_static_openvino_batch_pads_short_batches_and_splits_long_ones(extractor, fashion_arrays):
    from headstart.conversion import runner

    batch = _fashion_batch(fashion_arrays, 64)
    reference = runner(extractor, [None, 64, 64, 3], "tensorflow")(batch)[0]
    run = runner(extractor, [None, 64, 64, 3], "openvino", what="features", batch=8)
    for rows in (slice(0, 8), slice(0, 5), slice(0, 32), slice(3, 22)):
        (features,) = run(batch[rows])
        assert features.shape == reference[rows].shape
        assert np.abs(features - reference[rows]).max() < runtimes.TOLERANCE["f32"] * np.abs(reference).max()
