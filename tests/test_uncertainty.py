"""headstart/uncertainty.py on a real classifier's predictions (logistic regression on Fashion-MNIST pixels).

The vectorised bootstrap is checked against scikit-learn resample by resample; the intervals against
what a bootstrap must do (contain the estimate, narrow with more images); the paired comparison against
a hand-computed exact McNemar p-value and a class that really stops being predicted.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, recall_score

from headstart import uncertainty
from headstart.uncertainty import (
    Predictions,
    PredictionsError,
    bootstrap_intervals,
    compare_predictions,
    confusion_counts,
    parse_predictions,
    per_class_intervals,
    read_predictions,
    scores,
    wilson_interval,
    write_predictions,
)
from tests.conftest import FASHION_CLASSES

CLASSES = 10


@pytest.fixture(scope="module")
def predictions(fashion_arrays) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, predicted, probabilities) of a logistic regression fitted on 1,000 images, for 1,000 others."""
    images, labels = fashion_arrays
    pixels = images.reshape(len(images), -1) / 255.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs stops at max_iter on purpose: a quick, imperfect model
        model = LogisticRegression(max_iter=30).fit(pixels[:1000], labels[:1000])
    probs = model.predict_proba(pixels[1000:])
    return labels[1000:].astype(np.int64), probs.argmax(axis=1), probs


def test_bootstrap_scores_equal_scikit_learn_on_fixed_resamples(predictions) -> None:
    labels, predicted, _ = predictions
    rng = np.random.default_rng(7)
    without_class_3 = np.flatnonzero((labels != 3) & (predicted != 3))  # class 3 neither present nor predicted
    indices = np.stack([*rng.integers(0, len(labels), size=(4, len(labels))),
                        rng.choice(without_class_3, size=len(labels))])
    found = scores(confusion_counts(labels, predicted, CLASSES, indices))
    everyone = np.arange(CLASSES)
    for row, drawn in enumerate(indices):
        y, p = labels[drawn], predicted[drawn]
        assert found["accuracy"][row] == pytest.approx(accuracy_score(y, p))
        assert found["macro_f1"][row] == pytest.approx(f1_score(y, p, labels=everyone, average="macro", zero_division=0))
        np.testing.assert_allclose(found["recall"][row], recall_score(y, p, labels=everyone, average=None,
                                                                      zero_division=np.nan))
        np.testing.assert_allclose(found["f1"][row], f1_score(y, p, labels=everyone, average=None, zero_division=np.nan))
    assert np.isnan(found["recall"][-1][3]) and np.isnan(found["f1"][-1][3])


def test_intervals_contain_the_estimate_and_narrow_with_more_images(predictions) -> None:
    labels, predicted, _ = predictions
    widths = {}
    for n in (200, 1000):
        y, p = labels[:n], predicted[:n]
        found = bootstrap_intervals(y, p, CLASSES, 1000, seed=0)
        recall = recall_score(y, p, labels=np.arange(CLASSES), average=None, zero_division=0)
        assert found.accuracy[0] < accuracy_score(y, p) < found.accuracy[1]
        assert found.macro_f1[0] < f1_score(y, p, average="macro") < found.macro_f1[1]
        wilson = per_class_intervals(y, p, CLASSES)
        assert np.all((wilson["recall_low"] <= recall) & (recall <= wilson["recall_high"]))
        widths[n] = (found.accuracy[1] - found.accuracy[0], found.macro_f1[1] - found.macro_f1[0],
                     wilson["recall_high"] - wilson["recall_low"])
    assert widths[1000][0] < 0.7 * widths[200][0] and widths[1000][1] < 0.7 * widths[200][1]
    assert np.mean(widths[1000][2]) < 0.7 * np.mean(widths[200][2])


def test_the_seed_fixes_the_interval_whatever_the_block_size(predictions, monkeypatch) -> None:
    labels, predicted, _ = predictions
    whole = bootstrap_intervals(labels, predicted, CLASSES, 300, seed=3)
    assert bootstrap_intervals(labels, predicted, CLASSES, 300, seed=4).accuracy != whole.accuracy
    monkeypatch.setattr(uncertainty, "BLOCK_CELLS", 7 * len(labels))  # 43 blocks of 7 resamples, then 6
    blocked = bootstrap_intervals(labels, predicted, CLASSES, 300, seed=3)
    assert blocked.accuracy == whole.accuracy and blocked.macro_f1 == whole.macro_f1
    assert whole.as_metrics() == {"accuracy": {"low": whole.accuracy[0], "high": whole.accuracy[1]},
                                  "macro_f1": {"low": whole.macro_f1[0], "high": whole.macro_f1[1]}}


def test_wilson_intervals_are_not_degenerate_at_none_or_all_right() -> None:
    """144 of 144 right does not make a recall certain: the bootstrap says [1, 1], Wilson about [0.974, 1]."""
    found = wilson_interval(np.array([0, 144, 3, 5, 0]), np.array([144, 144, 3, 10, 0]))
    assert found[0][0] == 0 and 0.02 < found[0][1] < 0.03
    assert found[1][1] == pytest.approx(1) and 0.97 < found[1][0] < 0.98
    assert found[2][0] < 0.5  # 3 of 3 is weak evidence
    assert found[3] == pytest.approx([0.2366, 0.7634], abs=1e-4)  # the textbook Wilson interval of 5/10
    assert np.isnan(found[4]).all()  # no images: nothing to estimate
    labels = np.array([0] * 20 + [1] * 20 + [2] * 5)
    predicted = np.array([0] * 20 + [0] * 5 + [1] * 15 + [0] * 5)  # class 0 all found, class 2 never
    table = per_class_intervals(labels, predicted, 4)
    assert table.loc[0, "recall_low"] > 0.8 and table.loc[0, "recall_high"] == pytest.approx(1)
    assert table.loc[2, "recall_low"] == 0 and table.loc[2, "recall_high"] > 0.4
    assert table.loc[1, "precision_low"] > 0.75 and table.loc[1, "precision_high"] == pytest.approx(1)
    assert np.isnan(table.loc[2, "precision_low"]) and table.loc[3].isna().all()
    assert table.loc[0, "precision_high"] < 1  # 20 of 30 predicted as class 0 are right


AWKWARD = ["0", "NA", "ankle boot", "p:x", "été, \"quoted\"", "", "null", "1.0", "True", "-"]


def test_predictions_file_round_trips_any_class_names(predictions, tmp_path) -> None:
    labels, _, probs = predictions
    classes = [name or "nan" for name in AWKWARD]  # "" is no folder name; "nan" is the next worst
    paths = [f"data/raw/{classes[y]}/{i:05d}.png" for i, y in enumerate(labels)]
    target = tmp_path / "reports" / "predictions.csv"
    write_predictions(target, paths, [classes[y] for y in labels], probs.astype(np.float32), classes)
    found = read_predictions(target)
    assert found.classes == classes
    assert list(found.frame["path"]) == paths and list(found.frame["label"]) == [classes[y] for y in labels]
    assert list(found.frame["predicted"]) == [classes[i] for i in probs.argmax(axis=1)]
    np.testing.assert_allclose(found.probabilities, probs, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(found.frame["confidence"], probs.max(axis=1), rtol=1e-5)
    assert list(pd.read_csv(target, nrows=0).columns[4:]) == [f"p:{name}" for name in classes]


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.drop(columns="label"), "missing column(s) label"),
    (lambda t: t.drop(columns=["p:a", "p:b"]), "no p:<class> probability column"),
    (lambda t: t.assign(predicted=["a", "c"]), "predicted ['c'] not among its p:<class> columns"),
    (lambda t: t.assign(path=["x.png", "x.png"]), "path 'x.png' appears more than once"),
    (lambda t: t.assign(path=["x.png", ""]), "line 3 has an empty path"),
    (lambda t: t.assign(**{"p:b": ["0.5", "high"]}), "must be numbers"),
])
def test_bad_predictions_files_are_refused_with_the_file_and_the_fix(edit, message) -> None:
    table = pd.DataFrame({"path": ["x.png", "y.png"], "label": ["a", "b"], "predicted": ["a", "a"],
                          "confidence": ["0.9", "0.6"], "p:a": ["0.9", "0.6"], "p:b": ["0.1", "0.4"]})
    parse_predictions(table.to_csv(index=False), "ok.csv")
    with pytest.raises(PredictionsError, match=r"^main:reports/p\.csv: .*rerun `headstart evaluate`") as error:
        parse_predictions(edit(table).to_csv(index=False), "main:reports/p.csv")
    assert message in str(error.value)


def _as_predictions(paths: list[str], labels: np.ndarray, predicted: np.ndarray) -> Predictions:
    names = list(FASHION_CLASSES)
    frame = pd.DataFrame({"path": paths, "label": [names[y] for y in labels],
                          "predicted": [names[p] for p in predicted], "confidence": 1.0})
    return Predictions(frame=frame, classes=names, probabilities=np.eye(CLASSES)[predicted])


def _exact_mcnemar(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value written out: twice the smaller binomial(b + c, 1/2) tail, capped at 1."""
    n = b + c
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n)


def test_paired_comparison_flags_a_class_that_is_no_longer_predicted(predictions) -> None:
    labels, predicted, probs = predictions
    paths = [f"img/{i:04d}.png" for i in range(len(labels))]
    trouser = FASHION_CLASSES.index("trouser")
    second = np.argsort(probs, axis=1)[:, -2]
    head = np.where(predicted == trouser, second, predicted)  # the head model never says trouser
    base = _as_predictions(paths, labels, predicted)
    found = compare_predictions(base, _as_predictions(paths, labels, head), 1000, seed=0)

    b = int(((predicted == labels) & (head != labels)).sum())
    c = int(((predicted != labels) & (head == labels)).sum())
    assert (found.base_only_right, found.head_only_right) == (b, c) and b > 20
    assert found.mcnemar_p == pytest.approx(_exact_mcnemar(b, c), rel=1e-9) and found.mcnemar_p < 1e-6
    change, low, high = found.accuracy_change
    assert change == pytest.approx(accuracy_score(labels, head) - accuracy_score(labels, predicted))
    assert low < change < high < 0
    row = found.per_class.set_index("class").loc["trouser"]
    assert row["head_f1"] == 0 and row["high"] < 0 and row["dropped"]
    assert row["base_f1"] == pytest.approx(f1_score(labels, predicted, labels=[trouser], average=None)[0])
    assert not found.per_class.set_index("class").loc["bag", "dropped"]  # bag predictions did not change

    same = compare_predictions(base, base, 200, seed=0)
    assert same.mcnemar_p == 1.0 and same.accuracy_change == (0.0, 0.0, 0.0) and not same.per_class["dropped"].any()


def test_pairing_keeps_only_images_with_the_same_path_and_label(predictions) -> None:
    labels, predicted, _ = predictions
    paths = [f"img/{i:04d}.png" for i in range(len(labels))]
    base = _as_predictions(paths[:-2], labels[:-2], predicted[:-2])
    relabelled = labels.copy()
    relabelled[0] = (labels[0] + 1) % CLASSES
    head = _as_predictions(paths[:-1], relabelled[:-1], predicted[:-1])
    found = compare_predictions(base, head, 100, seed=0)
    assert found.images == len(labels) - 3
    assert found.only_base == [paths[0]] and found.only_head == [paths[0], paths[-2]]
    with pytest.raises(PredictionsError, match="share no test image"):
        compare_predictions(base, _as_predictions(["other.png"], labels[:1], predicted[:1]), 100, seed=0)
