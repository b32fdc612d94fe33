"""Parameter validation: every bad key or value is named, for the CLI (DVC) and the flows alike."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from headstart.params import Params, ParamsError, load_params
from tests.conftest import REPO_ROOT


def test_params_yaml_matches_the_defaults(tmp_path):
    assert load_params("params.yaml") == Params()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"split.bogus": 1}, "unknown key 'split.bogus'"),
        ({"train_head.epochs": "many"}, "key 'train_head.epochs' has value 'many'"),
        ({"finetune.learning_rate": -1}, "key 'finetune.learning_rate' has value -1: Input should be greater than 0"),
        ({"features.image_size": 8}, "key 'features.image_size' has value 8"),
        ({"train_head.optimizer": "adagrad"}, "'adam', 'sgd' or 'rmsprop'"),
        ({"nonsense": {"a": 1}}, "unknown key 'nonsense'"),
        ({"download.timeout_s": float("inf")}, "'download.timeout_s' has value inf: .* finite number"),
        ({"train_head.learning_rate": float("nan")}, "key 'train_head.learning_rate' has value nan"),
        ({"evaluate.assert_min_accuracy": float("nan")}, "key 'evaluate.assert_min_accuracy' has value nan"),
        ({"finetune.top_blocks": "most"}, "key 'finetune.top_blocks' has value 'most'"),
        ({"finetune.top_blocks": -2}, "key 'finetune.top_blocks' has value -2: Input should be greater than or equal to 0"),
        ({"finetune.schedule": "step"}, "'constant', 'cosine' or 'one_cycle'"),
        ({"finetune.epochs": 5, "finetune.unfreeze_epochs": 9}, "unfreeze_epochs (9) must not exceed epochs (5)"),
        ({"finetune.backbone_lr_multiplier": 0}, "key 'finetune.backbone_lr_multiplier' has value 0"),
        ({"finetune.augmentation.erasing": 1.5},
         "key 'finetune.augmentation.erasing' has value 1.5: Input should be less than or equal to 1"),
        ({"lr_find.end_lr": 1e-8}, "end_lr (1e-08) must be larger than start_lr (1e-07)"),
    ],
)
def test_bad_values_name_the_key_and_value(overrides, message):
    with pytest.raises(ParamsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_params("params.yaml", overrides)


def test_bad_yaml_file_is_named(tmp_path):
    broken = tmp_path / "params.yaml"
    broken.write_text("split: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(broken)


def test_overrides_nested_and_dotted(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train_head": {"epochs": 3}, "finetune": {"augmentation": {"zoom": 0.2}}}))
    params = load_params(path, {"train_head.learning_rate": 0.01, "finetune": {"augmentation": {"flip": "none"}}})
    assert (params.train_head.epochs, params.train_head.learning_rate) == (3, 0.01)
    assert params.finetune.augmentation.flip == "none" and params.finetune.augmentation.zoom == 0.2  # merged, not replaced


def test_cli_reports_a_bad_param_and_exits_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "split", "--root", str(tmp_path), "--set", "split.test=2"],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert result.returncode == 2
    assert "key 'split.test' has value 2" in result.stderr


def test_cli_reports_a_bad_source_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "download", "--root", str(tmp_path), "--set", "download.source=/no/such/folder"],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "download.source '/no/such/folder': no such preset, folder or file" in result.stderr
