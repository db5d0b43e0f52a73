"""What an evaluation writes: scores, predictions, the confusion matrix and per-class figures."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.nn import functional as F
from torchmetrics.classification import (MulticlassConfusionMatrix, MulticlassF1Score, MulticlassPrecision,
                                         MulticlassRecall)

# Each report is of the predictions in hand: no gathering from other processes (a DDP training writes
# its test reports in its first process alone, while the others have finished)
LOCAL = {"sync_on_compute": False}

from ..files import written_whole
from ..training.module import classification_metrics


def scores(probabilities: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The training run's test metrics (acc, acc_top5 with five or more classes, f1) and the loss.

    The loss is the NLL of the given probabilities: for averaged views there are no logits to
    take a cross-entropy of.
    """
    metrics = classification_metrics(probabilities.shape[1])(probabilities, labels)
    loss = F.nll_loss(probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny).log(), labels)
    return {name: float(value) for name, value in sorted({**metrics, "loss": loss}.items())}


def write_predictions(path: Path, probabilities: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> None:
    """One row per test image: its index in the split, true and predicted class, each class's probability."""
    predicted = probabilities.argmax(dim=1)
    with written_whole(path) as partial, open(partial, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["index", "label", "predicted", *classes])
        for index, (label, guess, row) in enumerate(zip(labels.tolist(), predicted.tolist(), probabilities.tolist())):
            writer.writerow([index, classes[label], classes[guess], *(f"{p:.6g}" for p in row)])


def write_confusion_matrix(directory: Path, probabilities: torch.Tensor, labels: torch.Tensor,
                           classes: Sequence[str], title: str = "") -> None:
    """confusion_matrix.csv (rows: true class, columns: predicted class) and the same as a picture."""
    import matplotlib

    matplotlib.use("Agg")  # files only, also on machines without a display
    from matplotlib import pyplot as plt

    confusion = MulticlassConfusionMatrix(len(classes), **LOCAL)
    counts = confusion(probabilities, labels)
    with written_whole(directory / "confusion_matrix.csv") as partial, open(partial, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["label", *classes])
        writer.writerows([name, *row] for name, row in zip(classes, counts.tolist()))
    size = min(4 + 0.5 * len(classes), 40)
    figure, axes = plt.subplots(figsize=(size, size))
    confusion.plot(ax=axes, labels=list(classes), add_text=len(classes) <= 30)  # counts stay legible
    axes.set_title(f"{title}{int(counts.trace())} of {int(counts.sum())} test images right")
    figure.tight_layout()
    with written_whole(directory / "confusion_matrix.png") as partial:
        figure.savefig(partial, dpi=100)
    plt.close(figure)


def write_per_class(path: Path, probabilities: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> None:
    num_classes = len(classes)
    columns = [metric(num_classes, average=None, **LOCAL)(probabilities, labels).tolist()
               for metric in (MulticlassPrecision, MulticlassRecall, MulticlassF1Score)]
    support = torch.bincount(labels, minlength=num_classes).tolist()
    with written_whole(path) as partial, open(partial, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["class", "precision", "recall", "f1", "support"])
        for name, precision, recall, f1, count in zip(classes, *columns, support):
            writer.writerow([name, f"{precision:.6g}", f"{recall:.6g}", f"{f1:.6g}", count])


def write_reports(directory: Path, probabilities: torch.Tensor, labels: torch.Tensor, classes: Sequence[str],
                  mode: str = "") -> list[Path]:
    """Every per-image and per-class file of one evaluation mode; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    write_predictions(directory / "predictions.csv", probabilities, labels, classes)
    write_confusion_matrix(directory, probabilities, labels, classes, title=f"tta={mode}: " if mode else "")
    write_per_class(directory / "per_class.csv", probabilities, labels, classes)
    return [directory / name for name in
            ("predictions.csv", "confusion_matrix.csv", "confusion_matrix.png", "per_class.csv")]
