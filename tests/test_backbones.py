"""The backbone zoo: converted ImageNet weights name real photos right and match torch's logits."""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import threading
from dataclasses import replace
from functools import partial
from pathlib import Path

import keras
import numpy as np
import pytest

from headstart.backbones.cuts import cut_points, resolve_unfreeze_index
from headstart.backbones.describe import describe_registry, inspect_backbone
from headstart.backbones.loading import build_feature_extractor, build_imagenet_classifier, load_backbone
from headstart.backbones.registry import REGISTRY, packaged_checkpoint
from headstart.backbones.weights import converted_weights
from headstart.files import sha256_file
from tests.fixtures.make_reference import center_crop_pixels, fixture_path, photo_path

pytestmark = pytest.mark.slow  # runs backbones

DARKNET = Path("/usr/share/darknet/data")
PACKAGED = ("mobilenet_v2_tv", "efficientnet_lite0")
# Keras' and torch's float32 kernels sum in different orders: the logits of the same pixels differ
# by ~1e-5 (measured 1.3e-5 at most). A wrong epsilon, padding or transpose moves them by >0.1.
LOGIT_TOLERANCE = 1e-3


def imagenet_1k_names() -> list[str]:
    """ImageNet-1k class names in the standard index order, from Debian darknet's label lists.

    darknet's first 1000 lines are the 1k synsets in darknet's order; the standard index order
    (torchvision, Keras) is the sorted synset ids.
    """
    wnids = (DARKNET / "imagenet.labels.list").read_text().splitlines()[:1000]
    names = (DARKNET / "imagenet.shortnames.list").read_text().splitlines()[:1000]
    by_wnid = dict(zip(wnids, names, strict=True))
    return [by_wnid[wnid] for wnid in sorted(wnids)]


def photo_dirs() -> dict[str, Path]:
    import skimage.data
    import sklearn.datasets

    return {
        "darknet": DARKNET,
        "skimage": Path(skimage.data.__file__).parent,
        "sklearn": Path(sklearn.datasets.__file__).parent / "images",
    }


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("backbone")


@pytest.fixture(scope="module")
def references() -> dict[str, dict]:
    return {backbone: json.loads(fixture_path(backbone).read_text()) for backbone in PACKAGED}


@pytest.fixture(scope="module")
def logits(weights_dir: Path, references: dict[str, dict]) -> dict[str, dict[str, np.ndarray]]:
    """Each converted classifier's logits for each reference photo (the same uint8 crops torch saw)."""
    dirs = photo_dirs()
    crops = {}
    for entry in references["mobilenet_v2_tv"]["photos"]:
        pixels = center_crop_pixels(photo_path(entry["photo"], dirs))
        assert pixels_sha256(pixels) == entry["pixels_sha256"], f"{entry['photo']}: crop differs from the fixture's"
        crops[entry["photo"]] = pixels
    batch = np.stack(list(crops.values())).astype("float32")
    result = {}
    for backbone in PACKAGED:
        outputs = build_imagenet_classifier(backbone, "packaged", weights_dir).predict(batch, verbose=0)
        result[backbone] = dict(zip(crops, outputs, strict=True))
    return result


def pixels_sha256(array: np.ndarray) -> str:
    return hashlib.sha256(array.tobytes()).hexdigest()


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max())
    return exp / exp.sum()


# ---------------------------------------------------------------- proof that the weights are right


def test_label_list_is_the_standard_imagenet_order() -> None:
    names = imagenet_1k_names()
    assert (names[0], names[22], names[207], names[285], names[967]) == (
        "tench", "bald eagle", "golden retriever", "Egyptian cat", "espresso"
    )


@pytest.mark.parametrize(("backbone", "eagle_classes"), [("mobilenet_v2_tv", {"bald eagle"}), ("efficientnet_lite0", {"bald eagle", "kite"})])
def test_converted_classifier_names_real_photos(logits: dict, backbone: str, eagle_classes: set[str]) -> None:
    names = imagenet_1k_names()
    by_photo = logits[backbone]
    top1 = {photo: names[int(np.argmax(values))] for photo, values in by_photo.items()}
    # eagle.jpg is a juvenile bald eagle (brown): Lite0 rates kite, the other bird of prey, first
    assert top1["darknet/eagle.jpg"] in eagle_classes
    assert set(np.argsort(-by_photo["darknet/eagle.jpg"])[:2]) == {21, 22}  # kite, bald eagle
    assert top1["skimage/chelsea.png"] in {"tabby", "tiger cat", "Egyptian cat"}
    assert top1["skimage/coffee.png"] in {"espresso", "cup"}
    assert top1["sklearn/china.jpg"] in {"palace", "monastery", "pagoda"}
    dog = int(np.argmax(by_photo["darknet/dog.jpg"]))
    assert 151 <= dog <= 268, f"dog.jpg came out as {names[dog]}"  # ImageNet's dog breeds


def test_mobilenet_v2_tv_is_sure_of_the_bald_eagle(logits: dict) -> None:
    eagle = softmax(logits["mobilenet_v2_tv"]["darknet/eagle.jpg"])[22]
    assert eagle > 0.65, f"bald eagle probability {eagle:.3f}; the exact replica gives ~0.73, Keras' padding ~0.57"


@pytest.mark.parametrize("backbone", PACKAGED)
def test_logits_match_torch_reference(logits: dict, references: dict, backbone: str) -> None:
    for entry in references[backbone]["photos"]:
        values = logits[backbone][entry["photo"]]
        assert [int(i) for i in np.argsort(-values)[:5]] == entry["top5"], entry["photo"]
        diff = np.abs(values[entry["top5"]] - np.asarray(entry["top5_logits"])).max()
        assert diff < LOGIT_TOLERANCE, f"{backbone} {entry['photo']}: logits differ from torch's by {diff:.2e}"


def test_feature_extractor_matches_classifier_features(weights_dir: Path, references: dict) -> None:
    """The backbone the pipeline uses is the classifier's own base, with the same preprocessing."""
    backbone = load_backbone("mobilenet_v2_tv", "packaged", 224, weights_dir, allow_random=False)
    assert backbone.weights_id == references["mobilenet_v2_tv"]["checkpoint_sha256"]
    assert backbone.feature_dim == 1280
    classifier = build_imagenet_classifier("mobilenet_v2_tv", "packaged", weights_dir)
    pixels = center_crop_pixels(photo_path("darknet/eagle.jpg", photo_dirs()))[None].astype("float32")
    features = build_feature_extractor(backbone).predict(pixels, verbose=0)
    head = classifier.get_layer("mobilenet_v2_tv_classifier").get_layer("logits")
    kernel, bias = head.get_weights()
    np.testing.assert_allclose(features @ kernel + bias, classifier.predict(pixels, verbose=0), atol=1e-3)


# ---------------------------------------------------------------- packaged conversion cache


def test_converted_weights_are_reused(tmp_path: Path) -> None:
    first = load_backbone("mobilenet_v2_tv", "packaged", 64, tmp_path)
    [converted] = tmp_path.glob("mobilenet_v2_tv-*.weights.h5")
    assert converted.name == f"mobilenet_v2_tv-{first.weights_id[:16]}.weights.h5"
    record = json.loads((tmp_path / "backbone.json").read_text())["mobilenet_v2_tv"]
    assert record["source_sha256"] == first.weights_id
    assert record["weights_sha256"] == sha256_file(converted)
    before = converted.stat()

    second = load_backbone("mobilenet_v2_tv", "packaged", 96, tmp_path)
    after = converted.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert second.weights_id == first.weights_id
    assert second.cache_id != first.cache_id  # the image size is part of the feature cache key
    for a, b in zip(first.base.get_weights(), second.base.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_damaged_converted_weights_are_converted_again(tmp_path: Path) -> None:
    good = load_backbone("mobilenet_v2_tv", "packaged", 64, tmp_path)
    [converted] = tmp_path.glob("*.weights.h5")
    converted.write_bytes(b"not an h5 file")
    again = load_backbone("mobilenet_v2_tv", "packaged", 64, tmp_path)
    assert converted.stat().st_size > 10_000_000
    np.testing.assert_array_equal(good.base.get_weights()[0], again.base.get_weights()[0])


# ---------------------------------------------------------------- other sources and backbones


def test_keras_backbone_with_random_weights_builds_and_saves_safely(tmp_path: Path) -> None:
    backbone = load_backbone("mobilenet_v3_small", "none", 64, tmp_path)
    assert (backbone.weights_id, backbone.feature_dim) == ("none", 576)
    assert not any(layer.trainable for layer in backbone.base.layers if layer.weights)
    extractor = build_feature_extractor(backbone)
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    features = extractor.predict(pixels, verbose=0)
    assert features.shape == (2, 576)
    extractor.save(tmp_path / "extractor.keras")
    reloaded = keras.saving.load_model(tmp_path / "extractor.keras", safe_mode=True)
    np.testing.assert_allclose(reloaded.predict(pixels, verbose=0), features, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mobilenet_v2_tv", lambda x: (x / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]),
        ("efficientnet_lite0", lambda x: (x - 127.0) / 128.0),
        ("vgg16", lambda x: x[..., ::-1] - [103.939, 116.779, 123.68]),
        ("xception", lambda x: x / 127.5 - 1.0),
        ("efficientnet_b0", lambda x: x),
    ],
)
def test_preprocessing_matches_each_family(tmp_path: Path, name: str, expected) -> None:
    backbone = load_backbone(name, "none", None, tmp_path)
    pixels = np.asarray([[[[0.0, 128.0, 255.0], [12.0, 200.0, 37.0]]]], dtype="float32")
    np.testing.assert_allclose(np.asarray(backbone.preprocess(pixels)), expected(pixels.astype("float64")), rtol=1e-5, atol=1e-4)


def test_local_weights_files_round_trip(tmp_path: Path) -> None:
    source = load_backbone("mobilenet_v3_small", "none", 64, tmp_path)
    h5 = tmp_path / "copied.weights.h5"
    source.base.save_weights(h5)
    whole = tmp_path / "copied.keras"
    source.base.save(whole)
    for path in (h5, whole):
        loaded = load_backbone("mobilenet_v3_small", str(path), 64, tmp_path, allow_random=False)
        assert loaded.weights_id == sha256_file(path)
        for a, b in zip(source.base.get_weights(), loaded.base.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)


def test_converted_file_copied_elsewhere_loads_as_a_local_file(tmp_path: Path) -> None:
    packaged = load_backbone("mobilenet_v2_tv", "packaged", 64, tmp_path / "cache")
    [converted] = (tmp_path / "cache").glob("*.weights.h5")
    copied = shutil.copy(converted, tmp_path / "mine.weights.h5")
    local = load_backbone("mobilenet_v2_tv", str(copied), 64, tmp_path / "elsewhere", allow_random=False)
    np.testing.assert_array_equal(packaged.base.get_weights()[-1], local.base.get_weights()[-1])


# ---------------------------------------------------------------- cut points and inspection


def test_cut_points_and_unfreeze_index(tmp_path: Path) -> None:
    backbone = load_backbone("mobilenet_v2_tv", "none", 64, tmp_path)
    layers = backbone.base.layers
    points = cut_points(backbone)
    assert list(points) == [f"block_{i}" for i in range(1, 18)] + ["top"]
    assert layers[points["block_16"]].name == "block_16_expand_conv"
    assert layers[points["top"]].name == "top_conv"
    assert resolve_unfreeze_index(backbone, None, 2) == points["block_17"]
    assert resolve_unfreeze_index(backbone, None, 0) == len(layers)
    assert resolve_unfreeze_index(backbone, "block_16", 2) == points["block_16"]
    assert resolve_unfreeze_index(backbone, "block_3_dw_conv", 2) == [l.name for l in layers].index("block_3_dw_conv")
    assert resolve_unfreeze_index(backbone, -3, 2) == len(layers) - 3
    assert resolve_unfreeze_index(backbone, 10, 2) == 10


def test_inception_cut_point_follows_the_keras_guide(tmp_path: Path) -> None:
    backbone = load_backbone("inception_v3", "none", 75, tmp_path)
    layers = backbone.base.layers
    assert layers[cut_points(backbone)["mixed9"] - 1].name == "mixed8"  # the guide freezes layers[:249]


@pytest.mark.parametrize(
    ("unfreeze_from", "top_blocks", "message"),
    [
        ("block_99", 2, r"'block_99' is neither a cut point nor a layer of mobilenet_v2_tv; cut points: block_1"),
        (500, 2, r"unfreeze_from 500 is out of range: mobilenet_v2_tv has \d+ layers"),
        (None, 19, r"top_blocks 19 for mobilenet_v2_tv: it has 18 blocks"),
        (1.5, 2, r"give a cut point, a layer name or an index"),
    ],
)
def test_bad_unfreeze_points(tmp_path: Path, unfreeze_from, top_blocks: int, message: str) -> None:
    backbone = load_backbone("mobilenet_v2_tv", "none", 64, tmp_path)
    with pytest.raises(ValueError, match=message):
        resolve_unfreeze_index(backbone, unfreeze_from, top_blocks)


def test_inspect_lists_every_layer_and_the_cut_points() -> None:
    report = inspect_backbone("mobilenet_v2_tv", "none", 64)
    lines = report.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("index"))
    assert lines[header].split() == ["index", "name", "type", "output", "shape", "params", "trainable"]
    stem = next(line for line in lines if " stem_conv " in line)
    assert stem.split()[:3] == ["2", "stem_conv", "Conv2D"] and "864" in stem  # 3*3*3*32 weights
    assert "(None, 2, 2, 1280)" in report
    assert "block_16         first layer" in report


def test_registry_description_names_every_backbone() -> None:
    text = describe_registry()
    for name in REGISTRY:
        assert name in text
    assert "packaged" in next(line for line in text.splitlines() if line.startswith("mobilenet_v2_tv"))


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("name", "weights", "size", "message"),
    [
        ("resnet_9000", "none", None, r"unknown backbone 'resnet_9000'; choose one of: mobilenet_v2_tv, efficientnet_lite0, vgg16"),
        ("vgg16", "packaged", 64, r"'packaged' is not available for backbone 'vgg16'; packaged weights exist for: mobilenet_v2_tv, efficientnet_lite0"),
        ("vgg16", "imagenett", 64, r"weights 'imagenett' for backbone vgg16: use one of imagenet, packaged, none or a path"),
        ("vgg16", "/nowhere/vgg.weights.h5", 64, r"weights file /nowhere/vgg.weights.h5 does not exist"),
        ("inception_v3", "none", 64, r"image_size 64 is too small for inception_v3; it needs at least 75"),
    ],
)
def test_bad_backbone_requests(tmp_path: Path, name: str, weights: str, size: int | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_backbone(name, weights, size, tmp_path)


def test_a_different_checkpoint_is_refused_before_conversion(tmp_path: Path) -> None:
    lite = packaged_checkpoint(REGISTRY["efficientnet_lite0"])
    with pytest.raises(ValueError, match=r"efficientnet-lite0-57934424\.pth has sha256 5793.*expected b0353104.*reinstall"):
        converted_weights(REGISTRY["mobilenet_v2_tv"], lite, tmp_path)
    assert not list(tmp_path.iterdir())


def test_random_weights_refused_unless_allowed(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"weights 'none' gives vgg16 random weights.*allow_random_weights"):
        load_backbone("vgg16", "none", 64, tmp_path, allow_random=False)


def test_weights_file_of_another_backbone_is_refused(tmp_path: Path) -> None:
    other = load_backbone("vgg16", "none", 64, tmp_path)
    path = tmp_path / "vgg16.weights.h5"
    other.base.save_weights(path)
    with pytest.raises(ValueError, match=r"vgg16\.weights\.h5 does not hold the base weights of backbone mobilenet_v3_small"):
        load_backbone("mobilenet_v3_small", str(path), 64, tmp_path)
    with pytest.raises(ValueError, match=r"vgg16\.weights\.h5 does not hold the base weights of backbone mobilenet_v2_tv: .*; nor its converted classifier's"):
        load_backbone("mobilenet_v2_tv", str(path), 64, tmp_path)


@pytest.fixture
def checkpoint_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """torchvision's checkpoint (the packaged file) served on 127.0.0.1 at the registry's download address;
    yields the folder served, so a test can take the file away."""
    spec = REGISTRY["mobilenet_v2_tv"]
    www = tmp_path / "www"
    www.mkdir()
    shutil.copy(packaged_checkpoint(spec), www / "mobilenet_v2.pth")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/mobilenet_v2.pth"
    monkeypatch.setitem(REGISTRY, spec.name, replace(spec, packaged=replace(spec.packaged, url=url)))
    yield www
    server.shutdown()
    server.server_close()


def test_imagenet_download_gives_the_checkpoint(tmp_path: Path, checkpoint_server: Path) -> None:
    """weights: imagenet fetches torchvision's own file and converts it like the packaged one."""
    backbone = load_backbone("mobilenet_v2_tv", "imagenet", 64, tmp_path / "weights")
    assert backbone.weights_id == REGISTRY["mobilenet_v2_tv"].packaged.sha256
    assert (tmp_path / "weights" / "downloads" / "mobilenet_v2.pth").exists()  # in the folder asked, not /tmp


def test_imagenet_download_failure_says_what_to_use_instead(tmp_path: Path, checkpoint_server: Path) -> None:
    (checkpoint_server / "mobilenet_v2.pth").unlink()  # the address answers 404, as offline or moved
    with pytest.raises(ValueError, match=r"could not download ImageNet weights for mobilenet_v2_tv .*"
                                         r"Use weights: packaged"):
        load_backbone("mobilenet_v2_tv", "imagenet", 64, tmp_path / "weights")
