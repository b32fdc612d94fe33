"""headstart predict on real photos with every exported format, real files, folders and a real HTTP server."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image
from scipy.special import softmax

from headstart import predict
from headstart.data.datasets import image_dataset
from headstart.data.images import load_rgb
from headstart.serving import load_predictor
from headstart.web import FetchError, fetch_bytes
from tasks import cli
from tests.conftest import REPO_ROOT

MODELS = {
    "keras": "model.keras",
    "saved_model": "saved_model",
    "tflite_float32": "model_float32.tflite",
    "tflite_float16": "model_float16.tflite",
    "tflite_int8": "model_int8.tflite",
    "onnx": "model.onnx",
    "openvino": "model.xml",
}


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, photos) -> Path:
    """Real photos plus variants made here: CMYK JPEG, grayscale PNG, and a PNG upright and EXIF-rotated."""
    folder = tmp_path_factory.mktemp("photos")
    for path in sorted(photos.values()):
        (folder / path.name).write_bytes(path.read_bytes())
    with Image.open(photos["eagle"]) as eagle:
        eagle.convert("CMYK").save(folder / "eagle_cmyk.jpg", quality=95)
        eagle.convert("L").save(folder / "eagle_gray.png")
    with Image.open(photos["dog"]) as dog:
        dog.save(folder / "dog_upright.png")
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": stored sideways
        dog.transpose(Image.Transpose.ROTATE_90).save(folder / "dog_exif_rotated.png", exif=exif)
    return folder


def _run(model: Path, inputs: list[str], fmt: str = "jsonl", k: int = 4, **limits) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    failures = predict.predict_inputs(load_predictor(model), inputs, k, fmt, out, err, **limits)
    return failures, out.getvalue(), err.getvalue()


def _probabilities(jsonl: str, classes: list[str]) -> dict[str, np.ndarray]:
    result = {}
    for line in jsonl.splitlines():
        row = json.loads(line)
        scores = {p["label"]: p["probability"] for p in row["predictions"]}
        result[Path(row["input"]).name] = np.array([scores[c] for c in classes])
    return result


@pytest.mark.slow
def test_every_format_agrees_on_real_photos_and_variants(exported_tree, photo_dir):
    classes = (exported_tree.export_dir / "labels.txt").read_text().split()
    results = {}
    for fmt, name in MODELS.items():
        if not (exported_tree.export_dir / name).exists():  # its runtime is not installed
            continue
        failures, out, err = _run(exported_tree.export_dir / name, [str(photo_dir)])
        assert failures == 0, err
        results[fmt] = _probabilities(out, classes)
    images = sorted(results["keras"])
    assert len(images) >= 10 and {"eagle_cmyk.jpg", "eagle_gray.png", "dog_exif_rotated.png"} <= set(images)
    for fmt in ("saved_model", "tflite_float32", "tflite_float16", *({"onnx", "openvino"} & set(results))):
        assert sorted(results[fmt]) == images
        for image in images:
            keras_probs, probs = results["keras"][image], results[fmt][image]
            assert probs.argmax() == keras_probs.argmax(), (fmt, image, probs, keras_probs)
            assert np.abs(probs - keras_probs).max() < (0.02 if fmt == "tflite_float16" else 1e-4), (fmt, image)
    for image, probs in results["tflite_int8"].items():  # quantised: reported, not required to agree
        assert probs.sum() == pytest.approx(1.0, abs=0.03), image
    # EXIF orientation is applied: the sideways-stored copy is the same picture as the upright one
    # (both PNG: a JPEG is reduced while decoding, so its pixels differ slightly from a PNG's)
    keras_probs = results["keras"]
    np.testing.assert_allclose(keras_probs["dog_exif_rotated.png"], keras_probs["dog_upright.png"], atol=1e-6)


@pytest.mark.slow
def test_bad_files_get_one_line_each_and_the_rest_are_predicted(exported_tree, photo_dir, tmp_path, capsys):
    truncated = tmp_path / "truncated.jpg"
    data = (photo_dir / "eagle.jpg").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image at all\n")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    inputs = [str(photo_dir / "eagle.jpg"), str(truncated), str(text), str(empty), str(tmp_path / "missing.jpg"),
              str(photo_dir / "dog.jpg")]
    status = cli.main(["predict", *inputs, "--model", str(exported_tree.export_dir / "model.keras"), "--format", "csv"])
    captured = capsys.readouterr()
    assert status == 1
    errors = captured.err.strip().splitlines()
    assert len(errors) == 4, errors
    assert "truncated.jpg: corrupt or truncated" in errors[0]
    assert "notes.jpg: not an image Pillow can decode" in errors[1]
    assert "empty.png: empty file" in errors[2]
    assert "missing.jpg: no such file or folder" in errors[3]
    rows = list(csv.DictReader(io.StringIO(captured.out)))
    assert [r["input"] for r in rows] == [inputs[0]] * 3 + [inputs[-1]] * 3  # default top-3
    for image in (inputs[0], inputs[-1]):
        probabilities = [float(r["probability"]) for r in rows if r["input"] == image]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0 + 1e-6


@pytest.mark.slow
def test_folder_input_skips_hidden_and_non_image_names_and_exits_zero(exported_tree, photo_dir, tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)  # short relative names: the table folds a long path across lines
    folder = Path("inbox")
    (folder / "nested").mkdir(parents=True)
    (folder / "a.jpg").write_bytes((photo_dir / "eagle.jpg").read_bytes())
    (folder / "nested" / "b.png").write_bytes((photo_dir / "eagle_gray.png").read_bytes())
    (folder / "README.txt").write_text("labels go here")
    (folder / ".DS_Store").write_bytes(b"\x00\x01")
    status = cli.main(["predict", str(folder), "--model", str(exported_tree.export_dir / "model_float32.tflite"),
                       "--format", "table", "--top-k", "2"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "a.jpg" in captured.out and "b.png" in captured.out and "README" not in captured.out
    classes = (exported_tree.export_dir / "labels.txt").read_text().split()
    assert any(name in captured.out for name in classes) and "#2" in captured.out


TRICKLE_S = 0.2  # one byte per this many seconds, for TRICKLE_BYTES bytes: longer than any timeout used here
TRICKLE_BYTES = 30


class _Handler(SimpleHTTPRequestHandler):
    def _trickle(self, data: bytes) -> None:
        for byte in data[:TRICKLE_BYTES]:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(TRICKLE_S)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path == "/trickle-body.jpg":  # each byte arrives well within a per-read timeout
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self._trickle(b"\xff\xd8" + bytes(998))
            return
        if self.path == "/trickle-headers.jpg":
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            self._trickle(b"X-Slow: " + b"a" * 100)
            return
        if self.path == "/slow.jpg":  # headers, then a stall longer than the client's timeout
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            self.wfile.write(b"\xff\xd8")
            self.wfile.flush()
            time.sleep(3)
            return
        if self.path.startswith("/unsized/"):  # no Content-Length: only the streamed count can stop it
            body = Path(self.directory, self.path.removeprefix("/unsized/")).read_bytes()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # clients that stop reading at the size limit break the pipe on purpose


@pytest.fixture
def server(photo_dir):
    httpd = _QuietServer(("127.0.0.1", 0), partial(_Handler, directory=str(photo_dir)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.slow
def test_url_from_a_real_server_matches_the_file(exported_tree, photo_dir, server):
    model = exported_tree.export_dir / "model.keras"
    failures, from_url, err = _run(model, [f"{server}/eagle_cmyk.jpg"])
    assert failures == 0, err
    failures, from_file, _ = _run(model, [str(photo_dir / "eagle_cmyk.jpg")])
    classes = (exported_tree.export_dir / "labels.txt").read_text().split()
    np.testing.assert_array_equal(_probabilities(from_url, classes)["eagle_cmyk.jpg"],
                                  _probabilities(from_file, classes)["eagle_cmyk.jpg"])


@pytest.mark.slow
def test_url_failures_are_reported_and_limited(exported_tree, photo_dir, server):
    small, large = sorted(("eagle.jpg", "dog.jpg"), key=lambda name: (photo_dir / name).stat().st_size)
    limit = (photo_dir / small).stat().st_size
    inputs = [f"{server}/absent.jpg", f"{server}/{large}", f"{server}/unsized/{large}", f"{server}/slow.jpg",
              f"{server}/{small}"]
    failures, out, err = _run(exported_tree.export_dir / "model.keras", inputs, max_bytes=limit, timeout_s=1.0)
    lines = err.strip().splitlines()
    assert failures == 4 and len(lines) == 4, lines
    assert "absent.jpg: HTTP 404" in lines[0]
    assert f"{large}: {(photo_dir / large).stat().st_size} bytes exceeds the {limit}-byte limit" in lines[1]
    assert f"unsized/{large}: more than {limit} bytes" in lines[2]
    assert "slow.jpg: took longer than 1 s (--timeout)" in lines[3]
    assert [json.loads(line)["input"] for line in out.splitlines()] == [f"{server}/{small}"]


@pytest.mark.parametrize("path", ["trickle-body.jpg", "trickle-headers.jpg"])
def test_timeout_is_a_total_deadline_per_url(server, path):
    """A byte every 0.2 s never trips a per-read timeout, so only a deadline on the whole download stops it."""
    with pytest.raises(FetchError, match=r"took longer than 1 s \(--timeout\)"):
        fetch_bytes(f"{server}/{path}", max_bytes=10**6, timeout_s=1.0)


@pytest.mark.slow
def test_non_http_schemes_are_refused(exported_tree, photo_dir, capsys):
    inputs = [f"file://{photo_dir / 'eagle.jpg'}", "ftp://127.0.0.1/eagle.jpg", str(photo_dir / "dog.jpg")]
    status = cli.main(["predict", *inputs, "--model", str(exported_tree.export_dir / "saved_model"), "--format", "jsonl"])
    captured = capsys.readouterr()
    assert status == 1
    assert "scheme 'file' is not allowed; only http and https" in captured.err
    assert "scheme 'ftp' is not allowed" in captured.err
    assert len(captured.out.splitlines()) == 1


def test_decoding_goes_through_the_one_image_loader(photo_dir):
    """CMYK and grayscale variants come out as RGB uint8 with the original's size."""
    original = load_rgb(photo_dir / "eagle.jpg")
    for name in ("eagle_cmyk.jpg", "eagle_gray.png"):
        image = load_rgb(photo_dir / name)
        assert image.dtype == np.uint8 and image.shape == original.shape, name
    gray = load_rgb(photo_dir / "eagle_gray.png")
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("nowhere/model.keras", "model nowhere/model.keras not found"),
        ("labels.txt", "unknown model format"),
        ("../../models/finetune/model.keras", "not uint8 RGB images of any size"),
    ],
)
def test_unusable_models_exit_2_with_a_clear_message(exported_tree, photo_dir, capsys, model, message):
    path = model if model.startswith("nowhere") else str(exported_tree.export_dir / model)
    status = cli.main(["predict", str(photo_dir / "dog.jpg"), "--model", path])
    assert status == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_missing_labels_file_is_explained(exported_tree, tmp_path):
    lone = tmp_path / "model_float16.tflite"
    lone.write_bytes((exported_tree.export_dir / "model_float16.tflite").read_bytes())
    with pytest.raises(FileNotFoundError, match="no labels.txt found beside"):
        load_predictor(lone)


@pytest.fixture(scope="module")
def large_photo(tmp_path_factory, photos) -> Path:
    """A real photo upscaled to 24 MP and saved as a camera would (JPEG)."""
    target = tmp_path_factory.mktemp("large") / "eagle_24mp.jpg"
    with Image.open(photos["eagle"]) as eagle:
        eagle.convert("RGB").resize((6000, 4000), Image.Resampling.BICUBIC).save(target, quality=90)
    return target


def _decode_in_fresh_process(path: Path, target_size: int | None) -> tuple[tuple[int, int], int]:
    """(height, width) of the decoded image and the process's peak RSS in KiB (only numpy and Pillow loaded).

    VmHWM, not getrusage: Linux carries ru_maxrss over exec from the forked copy of this process.
    """
    code = ("import re, sys; from pathlib import Path; from headstart.data.images import load_rgb; "
            "image = load_rgb(sys.argv[1], target_size=int(sys.argv[2]) or None); "
            r"peak = re.search(r'VmHWM:\s+(\d+) kB', Path('/proc/self/status').read_text()).group(1); "
            "print(*image.shape[:2], peak)")
    done = subprocess.run([sys.executable, "-c", code, str(path), str(target_size or 0)], cwd=REPO_ROOT,
                          capture_output=True, text=True, check=True)
    height, width, peak = map(int, done.stdout.split())
    return (height, width), peak


def test_decoding_toward_the_model_size_bounds_memory(large_photo):
    """The full 24 MP picture (about 170 MB decoded) is never held when the model takes 32 px."""
    (full_h, full_w), full_peak = _decode_in_fresh_process(large_photo, None)
    (small_h, small_w), small_peak = _decode_in_fresh_process(large_photo, 32)
    assert (full_h, full_w) == (4000, 6000)
    assert 32 <= min(small_h, small_w) < 64 and small_w / small_h == pytest.approx(1.5, rel=0.05)
    assert full_peak - small_peak > 100 * 1024, (full_peak, small_peak)


@pytest.mark.slow
def test_large_photos_are_predicted_as_the_training_pipeline_sees_them(exported_tree, large_photo):
    """predict decodes toward the model's input size, exactly as training and evaluate do."""
    model = exported_tree.export_dir / "model.keras"
    predictor = load_predictor(model)
    info = json.loads((exported_tree.finetune_dir / "info.json").read_text())
    assert predictor.image_size == info["image_size"]
    source, = predict.expand_inputs([str(large_photo)], 10**6, 1.0, predictor.image_size)
    assert min(source.load().shape[:2]) < 2 * info["image_size"]
    failures, out, err = _run(model, [str(large_photo)])
    assert failures == 0, err
    classifier = keras.models.load_model(exported_tree.finetune_dir / "model.keras", safe_mode=True)
    pipeline = image_dataset([str(large_photo)], None, info["image_size"], 1, info["interpolation"])
    uncalibrated = classifier.predict(pipeline, verbose=0)[0].astype(np.float64)
    temperature = json.loads(exported_tree.metrics_file.read_text())["calibration"]["temperature"]
    expected = softmax(np.log(uncalibrated) / temperature)  # the export serves evaluate's calibrated model
    np.testing.assert_allclose(_probabilities(out, info["classes"])[large_photo.name], expected, atol=2e-6)


@pytest.mark.slow
def test_model_without_its_card_is_predicted_with_a_warning(exported_tree, photo_dir, tmp_path, capsys):
    for name in ("model.keras", "labels.txt"):
        (tmp_path / name).write_bytes((exported_tree.export_dir / name).read_bytes())
    status = cli.main(["predict", str(photo_dir / "dog.jpg"), "--model", str(tmp_path / "model.keras")])
    captured = capsys.readouterr()
    assert status == 0
    assert f"warning: no model_card.json beside {tmp_path / 'model.keras'}" in captured.err
    assert "dog.jpg" in captured.out
