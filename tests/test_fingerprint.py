"""The source fingerprint on real Fashion-MNIST images: it changes exactly when the data download reads
changes (folders, archives, labels files, URLs behind a real local HTTP server, presets), a touch
changes nothing, and the hash cache reads only what changed. DVC and Prefect: tests/test_lineage_dvc.py
and tests/test_flows.py."""

from __future__ import annotations

import csv
import hashlib
import http.server
import json
import os
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from headstart import hash_cache
from headstart.data.sources.candidates import DownloadError
from headstart.layout import Layout
from headstart.params import load_params
from tasks import download, fingerprint
from tests.conftest import write_class_folders

NO_FILE = "/nonexistent/params.yaml"


@pytest.fixture
def images(tmp_path: Path, fashion_arrays) -> Path:
    """3 classes x 12 real Fashion-MNIST PNGs."""
    pictures, labels = fashion_arrays
    keep = labels < 3
    return write_class_folders(tmp_path / "images", pictures[keep], labels[keep], per_class=12)


@pytest.fixture
def spare(fashion_arrays) -> list[Image.Image]:
    """Real images that are not in `images` (past the first 1,500)."""
    pictures, _ = fashion_arrays
    return [Image.fromarray(picture) for picture in pictures[1500:1510]]


def _fingerprint(project: Path, **download: object) -> tuple[dict, dict]:
    """(the stage's summary, the JSON it wrote)."""
    params = load_params(NO_FILE, {f"download.{key}": value for key, value in download.items()})
    layout = Layout(project)
    summary = fingerprint.run(params, layout)
    return summary, json.loads(layout.source_fingerprint.read_text())


def _tar_gz(folder: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as bundle:
        bundle.add(folder, arcname="my_dataset")
    return dest


def test_folder_adds_removals_and_edits_change_it_and_a_touch_does_not(tmp_path, images, spare):
    project = tmp_path / "project"
    _, first = _fingerprint(project, source=str(images))
    assert first["kind"] == "folder" and len(first["files"]) == 36
    assert first["files"]["trouser/00001.png"] == hashlib.sha256((images / "trouser/00001.png").read_bytes()).hexdigest()
    layout = Layout(project)
    written = layout.source_fingerprint.read_bytes()

    os.utime(images / "trouser" / "00003.png")  # touched: new mtime, same bytes
    (images / "notes.txt").write_text("not an image, download skips it\n")
    (images / "trouser" / ".DS_Store").write_bytes(b"\0hidden")
    _fingerprint(project, source=str(images))
    assert layout.source_fingerprint.read_bytes() == written

    digests = {first["digest"]}
    spare[0].save(images / "trouser" / "new.png")  # added
    _, added = _fingerprint(project, source=str(images))
    assert set(added["files"]) - set(first["files"]) == {"trouser/new.png"}
    (images / "pullover" / "00002.png").unlink()  # removed
    _, removed = _fingerprint(project, source=str(images))
    assert "pullover/00002.png" not in removed["files"]
    spare[1].save(images / "t-shirt" / "00004.png")  # edited in place
    _, edited = _fingerprint(project, source=str(images))
    assert edited["files"]["t-shirt/00004.png"] != removed["files"]["t-shirt/00004.png"]
    digests |= {added["digest"], removed["digest"], edited["digest"]}
    assert len(digests) == 4


def test_the_digest_is_content_not_place(tmp_path, images):
    _, here = _fingerprint(tmp_path / "a", source=str(images))
    moved = images.rename(tmp_path / "moved")
    _, there = _fingerprint(tmp_path / "b", source=str(moved))
    assert here["digest"] == there["digest"] and here["source"] != there["source"]


def test_unchanged_files_are_not_read_again(tmp_path, images, spare, monkeypatch):
    project = tmp_path / "project"
    monkeypatch.setattr(hash_cache, "RACY_S", 0.0)  # the images were written a moment ago
    assert _fingerprint(project, source=str(images))[0]["read"] == 36
    assert _fingerprint(project, source=str(images))[0]["read"] == 0
    os.utime(images / "trouser" / "00003.png")
    spare[0].save(images / "trouser" / "new.png")
    assert _fingerprint(project, source=str(images))[0]["read"] == 2  # the touched file and the new one


def test_an_edit_that_keeps_size_and_mtime_is_still_seen(tmp_path, images, monkeypatch):
    """`cp -p` or `rsync -t` can put the old mtime back on new bytes; the ctime in the key cannot be set."""
    project = tmp_path / "project"
    monkeypatch.setattr(hash_cache, "RACY_S", 0.0)
    _, first = _fingerprint(project, source=str(images))
    target = images / "trouser" / "00005.png"
    before, data = target.stat(), bytearray(target.read_bytes())
    data[-20] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    summary, second = _fingerprint(project, source=str(images))
    assert summary["read"] == 1 and second["files"]["trouser/00005.png"] != first["files"]["trouser/00005.png"]


def test_a_file_written_just_now_is_read_again_until_its_times_settle(tmp_path, images):
    """Within the file system's timestamp resolution a second write could keep size and times: not cached."""
    project = tmp_path / "project"
    assert _fingerprint(project, source=str(images))[0]["read"] == 36
    assert _fingerprint(project, source=str(images))[0]["read"] == 36


def test_an_archive_replaced_in_place_changes_it(tmp_path, images, spare):
    archive = _tar_gz(images, tmp_path / "images.tar.gz")
    _, first = _fingerprint(tmp_path / "project", source=str(archive))
    assert first["kind"] == "archive" and first["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    spare[0].save(images / "trouser" / "new.png")
    _tar_gz(images, archive)
    _, second = _fingerprint(tmp_path / "project", source=str(archive))
    assert second["digest"] != first["digest"]


def test_an_edited_labels_file_changes_it(tmp_path, images):
    labels = tmp_path / "labels.csv"
    rows = [(path.relative_to(images).as_posix(), path.parent.name) for path in sorted(images.rglob("*.png"))]
    with open(labels, "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label"), *rows])
    _, first = _fingerprint(tmp_path / "project", source=str(images), labels=str(labels))
    assert first["labels"] == hashlib.sha256(labels.read_bytes()).hexdigest()
    with open(labels, "a", newline="") as handle:
        csv.writer(handle).writerow(("trouser/00001.png", "pullover"))
    _, second = _fingerprint(tmp_path / "project", source=str(images), labels=str(labels))
    assert second["labels"] != first["labels"] and second["files"] == first["files"]


def test_a_preset_is_its_name_and_version(tmp_path):
    _, record = _fingerprint(tmp_path / "project", source="fashion_mnist")
    assert record["kind"] == "preset" and record["preset"] == {"name": "fashion_mnist", "version": 1}
    assert "files" not in record


class _VersionedFile(http.server.BaseHTTPRequestHandler):
    """Serves `body` at /images.tar.gz with an ETag of its content and a Last-Modified that moves with each
    version; 404 elsewhere."""

    body = b""
    version = 1
    seen: list[str] = []
    answers_head = True

    def _head(self) -> bool:
        type(self).seen.append(self.command)
        if self.path != "/images.tar.gz":
            self.send_error(404)
            return False
        self.send_response(200)
        self.send_header("ETag", f'"{hashlib.sha256(self.body).hexdigest()[:16]}"')
        self.send_header("Last-Modified", f"Mon, 0{self.version} Jun 2026 10:00:00 GMT")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        return True

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        if not self.answers_head:
            type(self).seen.append(self.command)
            self.send_error(501)
            return
        self._head()

    def do_GET(self) -> None:  # noqa: N802
        if self._head():
            self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def versioned(tmp_path: Path) -> Iterator[tuple[str, type[_VersionedFile]]]:
    handler = type("Handler", (_VersionedFile,), {"body": b"", "version": 1, "seen": [], "answers_head": True})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/images.tar.gz", handler
    finally:
        server.shutdown()
        server.server_close()


def test_a_url_whose_content_changes_behind_the_same_address(tmp_path, images, spare, versioned):
    url, handler = versioned
    handler.body = _tar_gz(images, tmp_path / "v1.tar.gz").read_bytes()
    project = tmp_path / "project"
    params = load_params(NO_FILE, {"download.source": url, "download.max_images_per_class": None})
    _, first = _fingerprint(project, source=url)
    assert first["kind"] == "url" and first["sha256"] == hashlib.sha256(handler.body).hexdigest()
    download.run(params, Layout(project))
    assert handler.seen == ["HEAD", "GET"]  # download found the fingerprint's fetch in the cache

    _, again = _fingerprint(project, source=url)
    assert again == first and handler.seen[2:] == ["HEAD"]  # unchanged: one HEAD, no transfer

    spare[0].save(images / "trouser" / "new.png")
    handler.body, handler.version = _tar_gz(images, tmp_path / "v2.tar.gz").read_bytes(), 2
    _, second = _fingerprint(project, source=url)
    assert second["digest"] != first["digest"]
    assert second["sha256"] == hashlib.sha256(handler.body).hexdigest()
    download.run(params, Layout(project))  # pins the new version once it has extracted
    manifest = pd.read_csv(Layout(project).raw_manifest)
    assert "data/raw/trouser/new.png" in set(manifest["path"])


def test_a_url_without_validators_is_fetched_again_and_must_match_its_pin(tmp_path, images, spare, versioned):
    """A server that answers no HEAD announces no version: each check fetches it, and a change is refused
    by the trust-on-first-use pin with the way out (a server that announces it is re-pinned, above)."""
    url, handler = versioned
    handler.answers_head = False
    handler.body = _tar_gz(images, tmp_path / "v1.tar.gz").read_bytes()
    project = tmp_path / "project"
    _, first = _fingerprint(project, source=url)
    download.run(load_params(NO_FILE, {"download.source": url}), Layout(project))  # pins it
    assert _fingerprint(project, source=url)[1] == first
    assert handler.seen == ["HEAD", "GET", "HEAD", "GET"]

    spare[0].save(images / "trouser" / "new.png")
    handler.body = _tar_gz(images, tmp_path / "v2.tar.gz").read_bytes()
    with pytest.raises(DownloadError, match=r"sha256 mismatch.*delete .*\.sha256"):
        _fingerprint(project, source=url)


def test_a_url_with_a_given_sha256_needs_no_request(tmp_path, versioned):
    url, handler = versioned
    _, record = _fingerprint(tmp_path / "project", source=url, sha256="ab" * 32)
    assert record["sha256"] == "ab" * 32 and handler.seen == []


def test_bad_sources_are_one_clear_error(tmp_path, images, versioned):
    with pytest.raises(DownloadError, match="no-such-folder.*no such preset, folder or file"):
        _fingerprint(tmp_path / "project", source=str(tmp_path / "no-such-folder"))
    with pytest.raises(DownloadError, match="labels 'missing.csv': no such file"):
        _fingerprint(tmp_path / "project", source=str(images), labels="missing.csv")
    url, _ = versioned
    with pytest.raises(DownloadError, match=r"127\.0\.0\.1.*/nothing-here.tgz: HTTP 404"):
        _fingerprint(tmp_path / "project", source=url.replace("images.tar.gz", "nothing-here.tgz"), retries=0)


def test_an_unreadable_file_is_named(tmp_path, images):
    """A file that cannot be read stops the check naming it (root reads any mode, so a read that fails:
    /proc/self/mem at offset 0 answers EIO)."""
    broken = images / "trouser" / "broken.png"
    if os.geteuid() == 0:
        broken.symlink_to("/proc/self/mem")
    else:
        broken.write_bytes(b"x")
        broken.chmod(0)
    with pytest.raises(DownloadError, match=rf"{broken}: cannot read it .*make it readable or move it out"):
        _fingerprint(tmp_path / "project", source=str(images))


def test_the_cli_writes_the_record_and_names_a_bad_source_in_one_line(tmp_path, images, capsys):
    from tasks.cli import main

    root = tmp_path / "project"
    assert main(["fingerprint", "--root", str(root), "--set", f"download.source={images}"]) == 0
    assert json.loads(Layout(root).source_fingerprint.read_text())["kind"] == "folder"
    missing = tmp_path / "gone"
    assert main(["fingerprint", "--root", str(root), "--set", f"download.source={missing}"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("headstart fingerprint: error: ") and str(missing) in line


def test_a_damaged_hash_cache_is_started_afresh(tmp_path, images, monkeypatch):
    project = tmp_path / "project"
    monkeypatch.setattr(hash_cache, "RACY_S", 0.0)
    _, first = _fingerprint(project, source=str(images))
    cache = Layout(project).fingerprint_cache
    cache.write_bytes(b"not a database, e.g. a disk that filled up mid-write\n" * 100)
    summary, again = _fingerprint(project, source=str(images))
    assert again == first and summary["read"] == 36
    assert _fingerprint(project, source=str(images))[0]["read"] == 0
