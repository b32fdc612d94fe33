"""The typed readers and the one writer of the stages' info.json files, on real files."""

from __future__ import annotations

import json

import pytest

from headstart.data.artifacts import (
    ArtifactError,
    FeaturesInfo,
    ModelInfo,
    read_features_info,
    read_model_info,
    write_info,
)
from headstart.layout import Layout

FEATURES = {"classes": ["0", "1", "NA"], "feature_dim": 1280, "image_size": 96, "backbone": "mobilenet_v2_tv",
            "weights_id": "abc", "cache_id": "x", "images_per_s": 201.5}


def test_written_info_reads_back_typed_with_the_extra_fields_kept(tmp_path) -> None:
    layout = Layout(tmp_path)
    write_info(layout.features_dir / "info.json", FEATURES, FeaturesInfo)
    info = read_features_info(layout)
    assert info.classes == ["0", "1", "NA"] and info.feature_dim == 1280 and info.image_size == 96
    assert info.images_per_s == 201.5  # the record for people stays as written


def test_the_writer_refuses_an_info_that_its_reader_could_not_use(tmp_path) -> None:
    with pytest.raises(ValueError, match="feature_dim"):
        write_info(tmp_path / "info.json", {**FEATURES, "feature_dim": "wide"}, FeaturesInfo)
    assert not (tmp_path / "info.json").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"classes": [0, 1], "image_size": 96}, r"classes\.0: Input should be a valid string"),
        ({"classes": ["a", "b"]}, r"image_size: Field required"),
        ("{not json", r"the file: Expecting property name"),
    ],
)
def test_a_bad_info_names_the_file_the_field_and_the_stage_to_rerun(tmp_path, content, message) -> None:
    layout = Layout(tmp_path)
    layout.finetune_dir.mkdir(parents=True)
    path = layout.finetune_dir / "info.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ArtifactError, match=message) as raised:
        read_model_info(layout)
    assert str(path) in str(raised.value) and "rerun `headstart finetune`" in str(raised.value)


def test_a_missing_info_says_which_stage_makes_it(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="run `headstart finetune` first"):
        read_model_info(Layout(tmp_path))
    assert ModelInfo(classes=["a"], image_size=32).interpolation == "bilinear"
