"""download stage on real images: HTTP fetches from a real local server, archives, bad inputs."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from headstart.data.sources.archives import safe_extract
from headstart.data.sources.candidates import DownloadError
from headstart.data.sources.fetch import fetch_url, pin_file, url_cache_path
from headstart.data.sources.folders import folder_candidates
from headstart.data.sources.presets import load_presets
from headstart.layout import Layout
from headstart.params import load_params
from tasks import download
from tests.conftest import FASHION_DIR, REPO_ROOT


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with Range support; can cut the first response short to simulate a dropped link,
    serve a file under a path with a query (`routes`) and send slowly (`delay_s` per 4 KiB)."""

    cut_after: int | None = None
    requests_seen: list[dict[str, str]] = []
    routes: dict[str, str] = {}
    delay_s = 0.0

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):  # noqa: N802 (http.server naming)
        type(self).requests_seen.append({"path": self.path, "range": self.headers.get("Range", "")})
        routed = type(self).routes.get(self.path)
        path = Path(self.directory) / routed if routed else Path(self.translate_path(self.path))
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
        for offset in range(0, len(body), 4096):
            self.wfile.write(body[offset : offset + 4096])
            time.sleep(type(self).delay_s)


@pytest.fixture
def http_root(tmp_path: Path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www; yields (base_url, folder, handler class)."""
    root = tmp_path / "www"
    root.mkdir()
    fresh_state = {"cut_after": None, "requests_seen": [], "routes": {}, "delay_s": 0.0}
    handler = type("Handler", (_RangeHandler,), fresh_state)
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
    assert [p.name for p in dest.parent.iterdir()] == ["images.tar.gz.lock"]  # an empty lock file


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
    candidates, *_ = folder_candidates(tmp_path, load_presets()["flowers17"])
    assert {c.name: c.label for c in candidates} == {
        "image_0001.jpg": "daffodil", "image_0080.jpg": "daffodil", "image_0081.jpg": "snowdrop", "image_0160.jpg": "snowdrop"}


def test_cats_vs_dogs_labels_from_file_names(tmp_path, photos):
    for name in ("cat.1.jpg", "dog.7.jpg"):
        shutil.copy(photos["dog"], tmp_path / name)
    (tmp_path / "PetImages" / "Cat").mkdir(parents=True)
    shutil.copy(photos["dog"], tmp_path / "PetImages" / "Cat" / "3.jpg")
    candidates, *_ = folder_candidates(tmp_path, load_presets()["cats_vs_dogs"])
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


# ------------------------------------------------------ dataset shapes: pre-split, one class, empty, reserved names


def test_presplit_tree_keeps_its_split_not_read_as_classes(tmp_path, small_dataset):
    tree = tmp_path / "presplit"
    for path in small_dataset.rglob("*.png"):
        split_name = "test" if int(path.stem) > 15 else "train"
        (tree / split_name / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, tree / split_name / path.parent.name / path.name)
    _, layout = _run(tmp_path, source=str(tree))
    manifest = pd.read_csv(layout.raw_manifest, dtype=str, keep_default_na=False)
    assert sorted(manifest["label"].unique()) == ["pullover", "t-shirt", "trouser"]
    expected = ["test" if int(Path(origin).stem) > 15 else "train" for origin in manifest["origin"]]
    assert list(manifest["source_split"]) == expected


def test_one_class_gets_its_own_message(tmp_path, small_dataset):
    for name in ("pullover", "t-shirt"):
        shutil.rmtree(small_dataset / name)
    with pytest.raises(DownloadError, match="only one class found: trouser; a classifier needs at least two"):
        _run(tmp_path, source=str(small_dataset), max_images_per_class=None)
    archive = _tar_gz(small_dataset, tmp_path / "one_class.tar.gz")  # my_dataset/trouser/*.png
    with pytest.raises(DownloadError, match="only one class found: trouser"):
        _run(tmp_path, source=str(archive), max_images_per_class=None)


def test_empty_folder_message_names_the_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DownloadError, match="no labelled images found") as error:
        _run(tmp_path, source=str(empty))
    assert f"(e.g. {empty}/cat/1.jpg)" in str(error.value) and "{folder}" not in str(error.value)


def test_class_folder_named_like_the_manifest_is_refused(tmp_path, small_dataset):
    (small_dataset / "trouser").rename(small_dataset / "manifest.csv")
    with pytest.raises(DownloadError, match=r"a class is named 'manifest.csv' .*rename that class folder"):
        _run(tmp_path, source=str(small_dataset), max_images_per_class=None)


# --------------------------------------------------------------------------- URL cache and trust on first use


def _labels(layout: Layout) -> list[str]:
    return sorted(pd.read_csv(layout.raw_manifest)["label"].unique())


@pytest.mark.parametrize(("first", "second"),
                         [("/v1/data.tar.gz", "/v2/data.tar.gz"), ("/get?id=1", "/get?id=2")])
def test_url_cache_is_keyed_on_the_whole_url(tmp_path, small_dataset, http_root, first, second):
    base, www, handler = http_root
    _tar_gz(small_dataset, www / "three.tar.gz")
    shutil.rmtree(small_dataset / "pullover")
    _tar_gz(small_dataset, www / "two.tar.gz")
    for url_path, name in ((first, "three.tar.gz"), (second, "two.tar.gz")):
        handler.routes[url_path] = name
    _, layout = _run(tmp_path, source=base + first, max_images_per_class=None)
    assert _labels(layout) == ["pullover", "t-shirt", "trouser"]
    _, layout = _run(tmp_path, source=base + second, max_images_per_class=None)
    assert _labels(layout) == ["t-shirt", "trouser"]
    assert [r["path"] for r in handler.requests_seen] == [first, second]


def test_error_page_is_not_pinned_and_a_fixed_server_is_used(tmp_path, small_dataset, http_root):
    base, www, _ = http_root
    (www / "data.tar.gz").write_text("<!DOCTYPE html><html><body>Service busy, try later</body></html>\n")
    with pytest.raises(DownloadError, match=r"not a zip or tar archive .*<!DOCTYPE html>.*was deleted"):
        _run(tmp_path, source=f"{base}/data.tar.gz", max_images_per_class=None)
    downloads = Layout(tmp_path / "project").downloads_dir
    assert not list(downloads.glob("*.sha256"))
    archive = _tar_gz(small_dataset, www / "data.tar.gz")  # the server is fixed
    summary, _ = _run(tmp_path, source=f"{base}/data.tar.gz", max_images_per_class=None)
    assert summary["images"] == 60
    assert [p.read_text().strip() for p in downloads.glob("*.sha256")] == [_sha(archive)]


def test_pin_mismatch_names_the_pin_file_and_clearing_it_recovers(tmp_path, small_dataset, http_root):
    base, www, _ = http_root
    url = f"{base}/data.tar.gz"
    _tar_gz(small_dataset, www / "data.tar.gz")
    _, layout = _run(tmp_path, source=url, max_images_per_class=None)
    cached = url_cache_path(layout.downloads_dir, url)
    pin = pin_file(cached)
    cached.unlink()  # the cache was cleared, and the file behind the URL changed since
    shutil.rmtree(small_dataset / "pullover")
    _tar_gz(small_dataset, www / "data.tar.gz")
    with pytest.raises(DownloadError, match="sha256 mismatch") as error:
        _run(tmp_path, source=url, max_images_per_class=None)
    assert f"delete {pin}" in str(error.value)
    pin.unlink()  # as the message says
    _, layout = _run(tmp_path, source=url, max_images_per_class=None)
    assert _labels(layout) == ["t-shirt", "trouser"]


def test_concurrent_downloads_of_one_url_fetch_it_once(tmp_path, small_dataset, http_root):
    base, www, handler = http_root
    archive = _tar_gz(small_dataset, www / "data.tar.gz")
    handler.delay_s = 0.02  # a slow link, so both fetches overlap
    dest = tmp_path / "dl" / "data.tar.gz"
    start = threading.Barrier(2)
    results, errors = [], []

    def fetch():
        start.wait()
        try:
            results.append(fetch_url(f"{base}/data.tar.gz", dest, None, timeout_s=10, retries=0))
        except Exception as exc:  # noqa: BLE001 (reported by the assertion below)
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and results == [dest, dest]
    assert _sha(dest) == _sha(archive) and len(handler.requests_seen) == 1


# --------------------------------------------------------------------------- archive formats and damage


def _archive_as(kind: str, folder: Path, dest: Path) -> Path:
    if kind == "zip":
        with zipfile.ZipFile(dest, "w") as bundle:
            for path in sorted(folder.rglob("*.png")):
                bundle.write(path, f"my_dataset/{path.relative_to(folder)}")
    else:
        with tarfile.open(dest, f"w:{kind}") as bundle:
            bundle.add(folder, arcname="my_dataset")
    return dest


@pytest.mark.parametrize("kind", ["zip", "", "gz", "bz2", "xz"])
def test_archive_format_is_read_from_the_content_not_the_name(tmp_path, small_dataset, kind):
    archive = _archive_as(kind, small_dataset, tmp_path / "dataset.bin")
    summary, _ = _run(tmp_path, source=str(archive), max_images_per_class=None)
    assert summary["images"] == 60


def test_archive_url_without_a_suffix_serving_a_zip(tmp_path, small_dataset, http_root):
    base, www, handler = http_root
    _archive_as("zip", small_dataset, www / "blob")
    handler.routes["/getfile?id=3"] = "blob"
    summary, _ = _run(tmp_path, source=f"{base}/getfile?id=3", max_images_per_class=None)
    assert summary["images"] == 60


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _flip_middle(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(("kind", "damage"), [("gz", _truncate), ("zip", _truncate), ("zip", _flip_middle)],
                         ids=["truncated-tar.gz", "truncated-zip", "corrupt-zip"])
def test_damaged_archive_is_one_clear_error(tmp_path, small_dataset, kind, damage):
    archive = damage(_archive_as(kind, small_dataset, tmp_path / f"data.{kind}"))
    with pytest.raises(DownloadError, match=rf"{archive}: truncated or corrupt .* download or copy it again"):
        _run(tmp_path, source=str(archive), max_images_per_class=None)
    assert not (tmp_path / "project" / "data" / "raw").exists()


def test_truncated_gzipped_idx_is_named(tmp_path):
    folder = tmp_path / "idx"
    folder.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(FASHION_DIR / name, folder / name)
    images = _truncate(folder / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(DownloadError, match=rf"{images}: truncated or corrupt gzip file"):
        _run(tmp_path, source=str(folder), max_images_per_class=5, min_images_per_class=5)


# --------------------------------------------------------------------------- outputs on disk


def test_outputs_follow_the_umask(tmp_path, small_dataset):
    previous = os.umask(0o027)
    try:
        _, layout = _run(tmp_path, source=str(small_dataset), max_images_per_class=None)
    finally:
        os.umask(previous)
    mode = lambda path: stat.S_IMODE(path.stat().st_mode)  # noqa: E731
    assert mode(layout.raw_dir) == mode(layout.raw_dir / "trouser") == 0o750
    assert mode(layout.raw_manifest) == mode(layout.quarantine) == 0o640


def _killed_inside(writer: str, target: Path) -> None:
    """Run `with headstart.files.<writer>(target)` in a process that is killed inside the block."""
    script = (f"import os, sys\nfrom headstart.files import {writer}\nwith {writer}(sys.argv[1]) as tmp:\n"
              "    os._exit(9)\n")
    result = subprocess.run([sys.executable, "-c", script, str(target)], cwd=REPO_ROOT, check=False)
    assert result.returncode == 9


def test_a_run_removes_stale_temps_of_its_own_outputs(tmp_path, small_dataset):
    layout = Layout(tmp_path / "project")
    _killed_inside("atomic_directory", layout.raw_dir)
    _killed_inside("atomic_path", layout.quarantine)
    _killed_inside("atomic_directory", layout.root / "data" / "cache" / "extract" / "0123456789abcdef")
    (layout.raw_dir.parent / ".raw.old-0123456789abcdef" / "old").mkdir(parents=True)  # a swap cut short
    stale = sorted(layout.root.rglob(".*.*-*"))
    assert len(stale) == 4
    an_hour_ago = time.time() - 3700
    for path in stale:
        os.utime(path, (an_hour_ago, an_hour_ago))
    _killed_inside("atomic_directory", layout.raw_dir)  # a live concurrent run's: young, so it stays
    live = sorted(set(layout.root.rglob(".*.*-*")) - set(stale))
    before = _tree_digest(small_dataset)
    _run(tmp_path, source=str(small_dataset), max_images_per_class=None)
    assert sorted(layout.root.rglob(".*.*-*")) == live
    assert _tree_digest(small_dataset) == before
