"""Scores of one model on one split: accuracy, top-k, precision/recall/F1 and log loss (scikit-learn)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, log_loss, precision_recall_fscore_support, top_k_accuracy_score


def top_k_accuracy(labels: np.ndarray, probs: np.ndarray, k: int) -> float:
    """Share of images whose class is among the `k` most probable, for any number of classes.

    With `k` >= the number of classes every image counts (1.0; scikit-learn only warns that this is
    meaningless). scikit-learn refuses two-column scores for two classes, so those pass the second
    class's probability, which ranks the two classes the same way (top-1 = probability above 0.5).
    """
    num_classes = probs.shape[1]
    if k >= num_classes:
        return 1.0
    scores = probs[:, 1] if num_classes == 2 else probs
    return float(top_k_accuracy_score(labels, scores, k=k, labels=np.arange(num_classes)))


def classification_metrics(labels: np.ndarray, probs: np.ndarray, top_k: int) -> dict[str, float]:
    """Accuracy, top-k accuracy, macro/weighted precision-recall-F1 and log loss of one model on one split."""
    num_classes = probs.shape[1]
    everyone = np.arange(num_classes)
    predicted = probs.argmax(axis=1)
    # float32 softmax rows sum to 1 only within ~1e-7; log_loss wants exact probabilities
    probs64 = probs.astype(np.float64)
    probs64 /= probs64.sum(axis=1, keepdims=True)
    result = {
        "accuracy": float(accuracy_score(labels, predicted)),
        "top_k_accuracy": top_k_accuracy(labels, probs64, top_k),
        "log_loss": float(log_loss(labels, probs64, labels=everyone)),
        "images": int(len(labels)),
    }
    for average in ("macro", "weighted"):
        precision, recall, f1, _ = precision_recall_fscore_support(
            labels, predicted, labels=everyone, average=average, zero_division=0
        )
        result.update({f"{average}_precision": float(precision), f"{average}_recall": float(recall),
                       f"{average}_f1": float(f1)})
    return result


def per_class_report(labels: np.ndarray, predicted: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """One row per class: precision, recall, F1 and support (scikit-learn's classification report)."""
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=np.arange(len(classes)), zero_division=0
    )
    return pd.DataFrame({"class": classes, "precision": precision, "recall": recall, "f1": f1, "support": support})
