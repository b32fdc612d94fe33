"""The `headstart` command's errors: one line naming the file and what to do; the traceback only with -v."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from tasks import cli
from tests.conftest import REPO_ROOT


def _headstart(capsys, *argv: str) -> tuple[int, str]:
    """Run the command in this process; (exit code, stderr)."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    return code, capsys.readouterr().err


def _one_line_error(stderr: str, command: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith(f"headstart {command}: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def test_a_named_params_file_must_exist(tmp_path, capsys, monkeypatch):
    typo = tmp_path / "typo.yaml"
    code, stderr = _headstart(capsys, "download", "--params", str(typo), "--root", str(tmp_path))
    assert code == 2
    assert f"--params {typo}: no such file" in _one_line_error(stderr, "download")
    assert not (tmp_path / "data").exists()
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the defaults apply, and split asks for download first
    code, stderr = _headstart(capsys, "split", "--root", str(tmp_path))
    assert code == 2 and "run the download stage first" in _one_line_error(stderr, "split")


def test_malformed_set_yaml_is_one_line(capsys):
    code, stderr = _headstart(capsys, "split", "--set", "split.salt=[unclosed")
    assert code == 2
    assert "--set 'split.salt=[unclosed': the value is not valid YAML" in _one_line_error(stderr, "split")


@pytest.mark.parametrize("value", [".inf", ".nan"])
def test_infinite_or_nan_timeout_is_one_line(tmp_path, capsys, value):
    code, stderr = _headstart(capsys, "download", "--root", str(tmp_path),
                              "--set", f"download.timeout_s={value}",
                              "--set", "download.source=http://127.0.0.1:9/data.zip")
    assert code == 2
    assert "key 'download.timeout_s' has value" in _one_line_error(stderr, "download")
    assert "finite number" in stderr


def test_a_full_disk_is_one_line_naming_the_output(tmp_path, small_dataset):
    """RLIMIT_FSIZE makes writes past 200 bytes fail as on a full disk (EFBIG; Python ignores SIGXFSZ)."""
    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))

    result = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "download", "--root", str(tmp_path / "project"),
         "--set", f"download.source={small_dataset}", "--set", "download.max_images_per_class=null"],
        cwd=REPO_ROOT, capture_output=True, text=True, preexec_fn=limit_file_size,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, check=False,
    )
    assert result.returncode == 2
    line = _one_line_error(result.stderr, "download")
    assert f"{tmp_path / 'project' / 'data'}" in line and "File too large. Free disk space" in line


def _tampered_keras(folder: Path) -> Path:
    """A real .keras file whose config was edited (a layer's units made a string)."""
    import keras

    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(2)])
    model.save(folder / "model.keras")
    with zipfile.ZipFile(folder / "model.keras") as bundle:
        members = {name: bundle.read(name) for name in bundle.namelist()}
    config = json.loads(members["config.json"])
    config["config"]["layers"][-1]["config"]["units"] = "two"
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(folder / "tampered.keras", "w") as bundle:
        for name, data in members.items():
            bundle.writestr(name, data)
    return folder / "tampered.keras"


@pytest.mark.slow
def test_a_tampered_keras_model_is_one_line_and_v_shows_the_traceback(tmp_path, capsys, fashion_arrays):
    model = _tampered_keras(tmp_path)
    image = tmp_path / "shirt.png"
    Image.fromarray(fashion_arrays[0][0]).save(image)
    code, stderr = _headstart(capsys, "predict", str(image), "--model", str(model))
    assert code == 2
    line = _one_line_error(stderr, "predict")
    assert str(model) in line and "export it again" in line
    code, stderr = _headstart(capsys, "-v", "predict", str(image), "--model", str(model))
    assert code == 2 and "Traceback" in stderr
