"""download stage on real images: HTTP fetches from a real local server, archives, bad inputs."""

from __future__ import annotations

import hashlib
import http.server
import io
import shutil
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks import download
from tasks.download import DownloadError, fetch_url, safe_extract
from tasks.layout import Layout
from tasks.params import load_params
from tests.conftest import FASHION_DIR


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with Range support; can cut the first response short to simulate a dropped link."""

    cut_after: int | None = None
    requests_seen: list[dict[str, str]] = []

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):  # noqa: N802 (http.server naming)
        type(self).requests_seen.append({"path": self.path, "range": self.headers.get("Range", "")})
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if type(self).cut_after is not None:
            cut, type(self).cut_after = type(self).cut_after, None
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


@pytest.fixture
def http_root(tmp_path: Path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www; yields (base_url, folder, handler class)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = type("Handler", (_RangeHandler,), {"cut_after": None, "requests_seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root, handler
    server.shutdown()
    server.server_close()


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def _tar_gz(folder: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as bundle:
        bundle.add(folder, arcname="my_dataset")
    return dest


def _run(tmp_path: Path, **download_params) -> tuple[dict, Layout]:
    layout = Layout(tmp_path / "project")
    params = load_params(tmp_path / "absent.yaml", {f"download.{k}": v for k, v in download_params.items()})
    return download.run(params, layout), layout


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- sources


def test_archive_from_url_lands_in_class_folders(tmp_path, small_dataset, http_root):
    base, www, _ = http_root
    archive = _tar_gz(small_dataset, www / "images.tar.gz")
    summary, layout = _run(tmp_path, source=f"{base}/images.tar.gz", sha256=_sha(archive), max_images_per_class=None)
    manifest = pd.read_csv(layout.raw_manifest)
    assert summary["images"] == 60 and summary["classes"] == 3
    assert sorted(manifest["label"].unique()) == ["pullover", "t-shirt", "trouser"]
    for row in manifest.itertuples():
        assert _sha(layout.root / row.path) == row.sha256


def test_interrupted_download_resumes_with_a_range_request(tmp_path, small_dataset, http_root):
    base, www, handler = http_root
    archive = _tar_gz(small_dataset, www / "images.tar.gz")
    handler.cut_after = archive.stat().st_size // 2
    dest = fetch_url(f"{base}/images.tar.gz", tmp_path / "dl" / "images.tar.gz", _sha(archive), timeout_s=10, retries=2)
    assert _sha(dest) == _sha(archive)
    ranges = [r["range"] for r in handler.requests_seen]
    assert ranges[0] == "" and ranges[1].startswith("bytes=") and int(ranges[1][6:-1]) > 0


def test_bad_checksum_is_refused_and_nothing_is_left(tmp_path, small_dataset, http_root):
    base, www, _ = http_root
    _tar_gz(small_dataset, www / "images.tar.gz")
    dest = tmp_path / "dl" / "images.tar.gz"
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        fetch_url(f"{base}/images.tar.gz", dest, "0" * 64, timeout_s=10, retries=0)
    assert list(dest.parent.iterdir()) == []


def test_http_error_names_the_url(tmp_path, http_root):
    base, _, _ = http_root
    with pytest.raises(DownloadError, match="404"):
        fetch_url(f"{base}/missing.zip", tmp_path / "missing.zip", None, timeout_s=5, retries=0)


def test_non_http_url_is_refused(tmp_path):
    with pytest.raises(DownloadError, match="only http and https"):
        fetch_url("ftp://127.0.0.1/x.zip", tmp_path / "x.zip", None)


def test_idx_files_fetched_over_http(tmp_path, http_root):
    base, www, _ = http_root
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(FASHION_DIR / name, www / name)
    folder = tmp_path / "idx"
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        fetch_url(f"{base}/{name}", folder / name, _sha(FASHION_DIR / name), timeout_s=10, retries=1)
    summary, layout = _run(tmp_path, source=str(folder), max_images_per_class=15)
    manifest = pd.read_csv(layout.raw_manifest, keep_default_na=False)
    assert summary["images"] == 150 and summary["classes"] == 10
    assert set(manifest["source_split"]) == {"test"}
    first = np.asarray(Image.open(layout.root / manifest["path"][0]))
    assert first.shape == (28, 28) and first.dtype == np.uint8


def test_default_preset_reads_the_debian_fashion_mnist(tmp_path):
    summary, layout = _run(tmp_path, source="fashion_mnist", max_images_per_class=12)
    manifest = pd.read_csv(layout.raw_manifest, keep_default_na=False)
    assert summary["classes"] == 10 and manifest.groupby("label").size().eq(12).all()
    assert "ankle_boot" in set(manifest["label"])
    again, layout2 = _run(tmp_path / "again", source="fashion_mnist", max_images_per_class=12)
    assert pd.read_csv(layout2.raw_manifest)["sha256"].tolist() == manifest["sha256"].tolist()


def test_unknown_source_lists_the_presets(tmp_path):
    with pytest.raises(DownloadError, match="no such preset.*fashion_mnist"):
        _run(tmp_path, source="not_a_dataset")


def test_flowers17_labels_by_file_index(tmp_path, fashion_arrays):
    images, _ = fashion_arrays
    folder = tmp_path / "jpg"
    folder.mkdir()
    for number in (1, 80, 81, 160):
        Image.fromarray(images[number]).save(folder / f"image_{number:04d}.jpg")
    candidates, _ = download.folder_candidates(tmp_path, download.load_presets()["flowers17"])
    assert {c.name: c.label for c in candidates} == {
        "image_0001.jpg": "daffodil", "image_0080.jpg": "daffodil", "image_0081.jpg": "snowdrop", "image_0160.jpg": "snowdrop"}


def test_cats_vs_dogs_labels_from_file_names(tmp_path, photos):
    for name in ("cat.1.jpg", "dog.7.jpg"):
        shutil.copy(photos["dog"], tmp_path / name)
    (tmp_path / "PetImages" / "Cat").mkdir(parents=True)
    shutil.copy(photos["dog"], tmp_path / "PetImages" / "Cat" / "3.jpg")
    candidates, _ = download.folder_candidates(tmp_path, download.load_presets()["cats_vs_dogs"])
    assert sorted((c.name, c.label) for c in candidates) == [("3.jpg", "cat"), ("cat.1.jpg", "cat"), ("dog.7.jpg", "dog")]


# --------------------------------------------------------------------------- malicious archives


def _tar_with(dest: Path, build) -> Path:
    with tarfile.open(dest, "w:gz") as bundle:
        build(bundle)
    return dest


def _add_bytes(bundle: tarfile.TarFile, name: str, data: bytes = b"x") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    bundle.addfile(info, io.BytesIO(data))


def _add_link(bundle: tarfile.TarFile, name: str, target: str, kind: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    bundle.addfile(info)


def _add_device(bundle: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    bundle.addfile(info)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda b: _add_bytes(b, "../escape.png"), "leaves the extraction folder"),
        (lambda b: _add_bytes(b, "/etc/evil.png"), "leaves the extraction folder"),
        (lambda b: _add_link(b, "data/link.png", "/etc/passwd", tarfile.SYMTYPE), "link to"),
        (lambda b: _add_link(b, "data/link.png", "../../outside", tarfile.SYMTYPE), "link to"),
        (lambda b: _add_link(b, "data/hard.png", "../outside", tarfile.LNKTYPE), "link to"),
        (lambda b: _add_device(b, "data/dev"), "device"),
        (lambda b: _add_bytes(b, "data/bomb.bin", bytes(3 * 2**20)), "max_archive_bytes"),
    ],
    ids=["traversal", "absolute", "symlink-absolute", "symlink-up", "hardlink", "device", "bomb"],
)
def test_malicious_tar_is_refused_and_nothing_escapes(tmp_path, build, message):
    archive = _tar_with(tmp_path / "evil.tar.gz", build)
    target = tmp_path / "box" / "extract"
    with pytest.raises(DownloadError, match=message):
        safe_extract(archive, target, max_bytes=2**20, max_members=100)
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["box", "evil.tar.gz"]
    assert list((tmp_path / "box").iterdir()) == []


def test_zip_traversal_and_member_count_are_refused(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as bundle:
        bundle.writestr("../../escape.png", b"x")
    with pytest.raises(DownloadError, match="leaves the extraction folder"):
        safe_extract(evil, tmp_path / "a", max_bytes=2**20, max_members=10)
    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as bundle:
        for i in range(11):
            bundle.writestr(f"c/{i}.png", b"x")
    with pytest.raises(DownloadError, match="max_archive_members"):
        safe_extract(many, tmp_path / "b", max_bytes=2**20, max_members=10)


def test_zip_bomb_with_lying_header_is_stopped_by_bytes_written(tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("c/zeros.png", bytes(8 * 2**20))
    with pytest.raises(DownloadError, match="max_archive_bytes"):
        safe_extract(bomb, tmp_path / "out", max_bytes=2**20, max_members=10)


# --------------------------------------------------------------------------- bad and unusual images


@pytest.fixture
def messy_folder(tmp_path, fashion_arrays, photos) -> Path:
    """Real images in every awkward form, made by the test from registry photos and Fashion-MNIST."""
    images, labels = fashion_arrays
    root = tmp_path / "messy"
    cls_a, cls_b = root / "animals", root / "clothes"
    cls_a.mkdir(parents=True)
    cls_b.mkdir(parents=True)
    dog = Image.open(photos["dog"]).convert("RGB").resize((96, 72))
    dog.save(cls_a / "dog_rgb.jpg")
    dog.convert("CMYK").save(cls_a / "dog_cmyk.jpg")
    dog.convert("L").save(cls_a / "dog_gray.png")
    dog.convert("P", palette=Image.Palette.ADAPTIVE).save(cls_a / "dog_palette.png")
    rgba = dog.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(cls_a / "dog_rgba.png")
    Image.fromarray((np.asarray(dog.convert("L"), dtype=np.uint16) * 257)).save(cls_a / "dog_16bit.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    dog.save(cls_a / "dog_exif_rotated.jpg", exif=exif)
    full = (cls_a / "dog_rgb.jpg").read_bytes()
    (cls_a / "dog_truncated.jpg").write_bytes(full[: len(full) // 2])
    (cls_a / "empty.jpg").write_bytes(b"")
    (cls_a / "not_really.png").write_text("this is a text file with an image name\n")
    (cls_a / ".DS_Store").write_bytes(b"\x00\x01")
    (cls_a / "notes.txt").write_text("labelled by hand\n")
    Image.open(photos["eagle"]).convert("RGB").resize((120, 90)).save(cls_a / "eagle.jpg")
    for i in range(6):
        Image.fromarray(images[i]).save(cls_b / f"item_{i}.png")
    shutil.copy(cls_b / "item_0.png", cls_b / "item_0_copy.png")  # same label duplicate
    shutil.copy(cls_b / "item_1.png", cls_a / "mislabelled.png")  # same content, two labels
    return root


def test_bad_images_are_quarantined_and_odd_ones_converted(tmp_path, messy_folder):
    before = _tree_digest(messy_folder)
    summary, layout = _run(tmp_path, source=str(messy_folder), max_images_per_class=None, min_images_per_class=4)
    assert _tree_digest(messy_folder) == before, "the user's source images must never change"

    quarantine = pd.read_csv(layout.quarantine)
    reasons = {Path(o).name: r for o, r in zip(quarantine["origin"], quarantine["reason"], strict=True)}
    assert "truncated" in reasons["dog_truncated.jpg"] or "corrupt" in reasons["dog_truncated.jpg"]
    assert "empty" in reasons["empty.jpg"]
    assert "not an image" in reasons["not_really.png"]
    assert reasons["item_0_copy.png"].startswith("duplicate of")
    assert "label conflict" in reasons["mislabelled.png"] and "label conflict" in reasons["item_1.png"]
    assert summary["skipped"] == 2  # .DS_Store and notes.txt

    manifest = pd.read_csv(layout.raw_manifest).set_index(manifest_key := "path")
    names = {Path(p).name: row for p, row in manifest.iterrows()}
    assert manifest_key == "path"
    for kept in ("dog_cmyk.jpg", "dog_gray.png", "dog_palette.png", "dog_rgba.png", "dog_16bit.png"):
        assert kept in names
    assert (names["dog_exif_rotated.jpg"]["width"], names["dog_exif_rotated.jpg"]["height"]) == (72, 96)
    assert names["dog_cmyk.jpg"]["mode"] == "CMYK" and names["dog_16bit.png"]["mode"].startswith("I")
    assert "item_0.png" in names and "item_0_copy.png" not in names and "item_1.png" not in names


def test_decompression_bomb_image_is_quarantined(tmp_path, small_dataset):
    bomb = small_dataset / "trouser" / "bomb.png"
    Image.new("1", (10_000, 10_000)).save(bomb)  # 100 M pixels in a few kB
    assert bomb.stat().st_size < 100_000
    summary, layout = _run(tmp_path, source=str(small_dataset), max_images_per_class=None)
    quarantine = pd.read_csv(layout.quarantine)
    assert quarantine["origin"].tolist() == [str(bomb)]
    assert "too large" in quarantine["reason"][0] and summary["images"] == 60


def test_too_few_images_names_the_class_and_count(tmp_path, small_dataset):
    for extra in sorted((small_dataset / "trouser").iterdir())[4:]:
        extra.unlink()
    with pytest.raises(DownloadError, match=r"'trouser' has 4 .*min_images_per_class=10"):
        _run(tmp_path, source=str(small_dataset), max_images_per_class=None)


def test_sampling_is_seeded_and_per_class(tmp_path, small_dataset):
    _, first = _run(tmp_path / "a", source=str(small_dataset), max_images_per_class=12)
    _, second = _run(tmp_path / "b", source=str(small_dataset), max_images_per_class=12)
    a, b = pd.read_csv(first.raw_manifest), pd.read_csv(second.raw_manifest)
    assert a.groupby("label").size().eq(12).all()
    assert a["sha256"].tolist() == b["sha256"].tolist()
