"""headstart predict on real photos with every exported format, real files, folders and a real HTTP server."""

from __future__ import annotations

import csv
import io
import json
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks import cli, predict
from tasks.images import load_rgb

MODELS = {
    "keras": "model.keras",
    "saved_model": "saved_model",
    "tflite_float32": "model_float32.tflite",
    "tflite_float16": "model_float16.tflite",
    "tflite_int8": "model_int8.tflite",
}


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, photos) -> Path:
    """Real photos plus variants made here: CMYK JPEG, grayscale PNG, and an EXIF-rotated PNG."""
    folder = tmp_path_factory.mktemp("photos")
    for path in sorted(photos.values()):
        (folder / path.name).write_bytes(path.read_bytes())
    with Image.open(photos["eagle"]) as eagle:
        eagle.convert("CMYK").save(folder / "eagle_cmyk.jpg", quality=95)
        eagle.convert("L").save(folder / "eagle_gray.png")
    with Image.open(photos["dog"]) as dog:
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": stored sideways
        dog.transpose(Image.Transpose.ROTATE_90).save(folder / "dog_exif_rotated.png", exif=exif)
    return folder


def _run(model: Path, inputs: list[str], fmt: str = "jsonl", k: int = 4, **limits) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    failures = predict.predict_inputs(predict.load_predictor(model), inputs, k, fmt, out, err, **limits)
    return failures, out.getvalue(), err.getvalue()


def _probabilities(jsonl: str, classes: list[str]) -> dict[str, np.ndarray]:
    result = {}
    for line in jsonl.splitlines():
        row = json.loads(line)
        scores = {p["label"]: p["probability"] for p in row["predictions"]}
        result[Path(row["input"]).name] = np.array([scores[c] for c in classes])
    return result


def test_every_format_agrees_on_real_photos_and_variants(exported_tree, photo_dir):
    classes = (exported_tree.export_dir / "labels.txt").read_text().split()
    results = {}
    for fmt, name in MODELS.items():
        failures, out, err = _run(exported_tree.export_dir / name, [str(photo_dir)])
        assert failures == 0, err
        results[fmt] = _probabilities(out, classes)
    images = sorted(results["keras"])
    assert len(images) >= 10 and {"eagle_cmyk.jpg", "eagle_gray.png", "dog_exif_rotated.png"} <= set(images)
    for fmt in ("saved_model", "tflite_float32", "tflite_float16"):
        assert sorted(results[fmt]) == images
        for image in images:
            keras_probs, probs = results["keras"][image], results[fmt][image]
            assert probs.argmax() == keras_probs.argmax(), (fmt, image, probs, keras_probs)
            assert np.abs(probs - keras_probs).max() < (0.02 if fmt == "tflite_float16" else 1e-4), (fmt, image)
    for image, probs in results["tflite_int8"].items():  # quantised: reported, not required to agree
        assert probs.sum() == pytest.approx(1.0, abs=0.03), image
    # EXIF orientation is applied: the sideways-stored copy is the same picture as the original
    np.testing.assert_allclose(results["keras"]["dog_exif_rotated.png"], results["keras"]["dog.jpg"], atol=1e-6)


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


def test_folder_input_skips_hidden_and_non_image_names_and_exits_zero(exported_tree, photo_dir, tmp_path, capsys):
    folder = tmp_path / "inbox"
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


class _Handler(SimpleHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
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


def test_url_from_a_real_server_matches_the_file(exported_tree, photo_dir, server):
    model = exported_tree.export_dir / "model.keras"
    failures, from_url, err = _run(model, [f"{server}/eagle_cmyk.jpg"])
    assert failures == 0, err
    failures, from_file, _ = _run(model, [str(photo_dir / "eagle_cmyk.jpg")])
    classes = (exported_tree.export_dir / "labels.txt").read_text().split()
    np.testing.assert_array_equal(_probabilities(from_url, classes)["eagle_cmyk.jpg"],
                                  _probabilities(from_file, classes)["eagle_cmyk.jpg"])


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
    assert "slow.jpg: download failed" in lines[3] and "timed out" in lines[3]
    assert [json.loads(line)["input"] for line in out.splitlines()] == [f"{server}/{small}"]


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


def test_missing_labels_file_is_explained(exported_tree, tmp_path):
    lone = tmp_path / "model_float16.tflite"
    lone.write_bytes((exported_tree.export_dir / "model_float16.tflite").read_bytes())
    with pytest.raises(FileNotFoundError, match="no labels.txt found beside"):
        predict.load_predictor(lone)
