"""Every metric a run logs equals scikit-learn's on the same predictions.

The model is replaced by a lookup table of logits, so the predictions are known in advance
and can be built to trap the metrics: the first batch of each split is entirely correct (which
once made torchmetrics merge top-1, top-5 and F1 into one state and log F1 1.0 for a model
whose own predictions gave 0.99), then come errors, some outside the top 5 too.
"""

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient
from pytorch_lightning.loggers import MLFlowLogger
from sklearn.metrics import accuracy_score, f1_score, log_loss, top_k_accuracy_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cnnlab.training.module import ImageClassifier

CLASSES = 10
BATCH = 16


class LookupNet(nn.Module):
    """Logits from a table, row i for the image whose pixels encode i (the module's normalisation is the identity)."""

    name = "lookup"
    aux_heads = False

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("table", logits)
        self.unused = nn.Parameter(torch.zeros(()))  # something for the optimizer to hold; its gradient is 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        index = (images[:, 0, 0, 0] * 256 + images[:, 1, 0, 0]).round().long()
        return self.table[index] + 0 * self.unused


def split(rng: np.random.Generator, size: int, offset: int):
    """Labels, logits (first batch all correct, then ~35% top-1 errors) and images encoding each row's index."""
    labels = np.concatenate([np.arange(CLASSES), rng.integers(0, CLASSES, size - CLASSES)])  # every class present
    logits = rng.normal(size=(size, CLASSES)).astype(np.float32)
    wrong = rng.random(size) < 0.35
    wrong[:BATCH] = False
    for i, label in enumerate(labels):  # the true class on top, or (when wrong) anywhere from 2nd to last
        order = np.argsort(-logits[i])
        rank = rng.integers(1, CLASSES) if wrong[i] else 0
        logits[i, [label, order[rank]]] = logits[i, [order[rank], label]]
    index = np.arange(offset, offset + size)
    images = np.zeros((size, 3, 2, 2), np.uint8)
    images[:, 0], images[:, 1] = (index // 256)[:, None, None], (index % 256)[:, None, None]
    return labels, logits, torch.from_numpy(images)


def expected(labels, logits) -> dict[str, float]:
    probabilities = torch.softmax(torch.from_numpy(logits), 1).numpy()
    predicted = logits.argmax(1)
    return {"acc": accuracy_score(labels, predicted),
            "acc_top5": top_k_accuracy_score(labels, logits, k=5, labels=range(CLASSES)),
            "f1": f1_score(labels, predicted, average="macro", labels=range(CLASSES)),
            "loss": log_loss(labels, probabilities, labels=range(CLASSES))}


def test_logged_metrics_equal_sklearn_on_the_same_predictions(tmp_path):
    rng = np.random.default_rng(0)
    sizes = {"train": 96, "val": 80, "test": 112}
    splits, offset = {}, 0
    for name, size in sizes.items():
        splits[name] = split(rng, size, offset)
        offset += size
    table = torch.from_numpy(np.concatenate([logits for _, logits, _ in splits.values()]))
    module = ImageClassifier(model={"_target_": "torch.nn.Identity"}, classes=[str(c) for c in range(CLASSES)],
                             optimizer={"_target_": "torch.optim.SGD", "lr": 0.1}, mean=(0, 0, 0),
                             std=(1 / 255,) * 3)
    module.net = LookupNet(table)
    loaders = {name: DataLoader(TensorDataset(images, torch.from_numpy(labels)), batch_size=BATCH)
               for name, (labels, _, images) in splits.items()}
    store = f"sqlite:///{tmp_path}/mlflow.db"
    logger = MLFlowLogger(experiment_name="metrics", tracking_uri=store, artifact_location=tmp_path.as_uri())
    trainer = pl.Trainer(max_epochs=1, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, loaders["train"], loaders["val"])
    trainer.test(module, loaders["test"], verbose=False)

    logged = MlflowClient(store).get_run(logger.run_id).data.metrics
    for name, (labels, logits, _) in splits.items():
        assert expected(labels, logits)["acc"] < 0.8  # the trap: errors after a perfect first batch
        for metric, value in expected(labels, logits).items():
            assert logged[f"{name}/{metric}"] == pytest.approx(value, abs=1e-5), f"{name}/{metric}"


def test_evaluation_scores_and_per_class_files_equal_sklearn(tmp_path):
    """What src/evaluate.py and src/ensemble.py report from probabilities (averaged views, ensembles)."""
    import csv

    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    from cnnlab.evaluation.reports import scores, write_reports

    labels, logits, _ = split(np.random.default_rng(1), 150, 0)
    probabilities = torch.softmax(torch.from_numpy(logits), 1)
    classes = [f"c{c}" for c in range(CLASSES)]
    reported = scores(probabilities, torch.from_numpy(labels))
    for metric, value in expected(labels, logits).items():
        assert reported[metric] == pytest.approx(value, abs=1e-5), metric

    write_reports(tmp_path, probabilities, torch.from_numpy(labels), classes)
    predicted = logits.argmax(1)
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=range(CLASSES),
                                                                     zero_division=0)
    rows = list(csv.DictReader(open(tmp_path / "per_class.csv")))
    assert [r["class"] for r in rows] == classes
    for column, values in {"precision": precision, "recall": recall, "f1": f1, "support": support}.items():
        np.testing.assert_allclose([float(r[column]) for r in rows], values, atol=1e-5, err_msg=column)
    _, *matrix = csv.reader(open(tmp_path / "confusion_matrix.csv"))
    np.testing.assert_array_equal(np.array([r[1:] for r in matrix], int),
                                  confusion_matrix(labels, predicted, labels=range(CLASSES)))
