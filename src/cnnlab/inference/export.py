"""``python src/export.py``: a checkpoint as an ONNX model, checked against PyTorch, optionally int8.

The exported graph is the whole ``ImageClassifier``: uint8 RGB images (N, 3, H, W), pixels 0-255,
in; logits out; the normalisation inside, so no runtime has to know the mean and std. Its metadata
still carries them, with the class names and the image sizes, for ``predict.py`` and for users.

int8 is static quantization in QDQ form, calibrated on training images as the model sees them:
onnxruntime's dynamic quantization turns convolutions into ConvInteger, which is slower than float on
CPUs. Both files are scored on the test split, so the accuracy int8 costs is a measured number.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from tqdm.auto import tqdm

from .. import tracking
from ..data.augment import eval_transform
from ..data.datamodule import to_tensor
from ..errors import ConfigError
from ..files import write_text
from .classifier import ONNX_INPUT, onnx_classifier, onnx_runner, onnx_session, recorded_sizes

log = logging.getLogger(__name__)

TOLERANCE = 1e-4  # largest difference from PyTorch's logits an exported model may have


def export_onnx(module: nn.Module, path: Path, image_size: int, metadata: dict[str, str], opset: int = 18) -> Path:
    """Write ``module`` (uint8 images -> logits) as ONNX with a dynamic batch axis and ``metadata``.

    torch's dynamo exporter specialises every size it sees once, so the example batch has two images:
    a batch of one would fix the batch axis at 1."""
    import onnx

    example = torch.randint(0, 256, (2, 3, image_size, image_size), dtype=torch.uint8)
    torch_onnx = logging.getLogger("torch.onnx")
    level = torch_onnx.level
    torch_onnx.setLevel(logging.ERROR)  # it names every torchvision operator it could not register
    try:
        program = torch.onnx.export(module.eval(), (example,), dynamo=True, opset_version=opset, verbose=False,
                                    input_names=[ONNX_INPUT], output_names=["logits"],
                                    dynamic_shapes={ONNX_INPUT: {0: torch.export.Dim("batch", min=1)}})
    finally:
        torch_onnx.setLevel(level)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path))
    set_metadata(onnx.load(str(path)), metadata, path)
    return path


def set_metadata(model, metadata: dict[str, str], path: Path) -> None:
    import onnx

    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def largest_difference(module: nn.Module, path: Path, image_size: int, batch: int = 3, seed: int = 0) -> float:
    """The largest |logit| difference between ``module`` and the ONNX file on random images; a batch
    other than the export's two shows that the batch axis stayed dynamic."""
    images = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        expected = module.eval()(images).float()
    return float((onnx_runner(onnx_session(path))(images) - expected).abs().max())


class Calibration:
    """onnxruntime's CalibrationDataReader: batches of training images, prepared as the model sees them."""

    def __init__(self, images: np.ndarray, batch_size: int = 32):
        self.batches = iter(np.array_split(images, max(1, len(images) // batch_size)))

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {ONNX_INPUT: batch}


def quantize_int8(fp32: Path, int8: Path, calibration: np.ndarray, metadata: dict[str, str]) -> Path:
    """Static int8 quantization (QDQ, per-channel int8 weights, uint8 activations) calibrated on ``calibration``."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = int8.with_suffix(".prepared.onnx")  # shapes inferred and graph optimised, as onnxruntime advises
    try:
        quant_pre_process(str(fp32), str(prepared))
        quantize_static(str(prepared), str(int8), Calibration(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    finally:
        prepared.unlink(missing_ok=True)
    set_metadata(onnx.load(str(int8)), {**metadata, "cnnlab.quantization": "int8 static QDQ"}, int8)
    return int8


def prepared_images(split, image_size: int, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A cached split's first ``limit`` images through the evaluation transform: (N, 3, S, S) uint8, labels."""
    count = len(split.labels) if limit is None else min(limit, len(split.labels))
    transform = eval_transform(image_size)
    images = np.stack([to_tensor(transform(image=np.asarray(split.images[i]))["image"]).numpy()
                       for i in range(count)])
    return images, np.asarray(split.labels[:count])


def onnx_accuracy(path: Path, images: np.ndarray, labels: np.ndarray, batch_size: int = 64) -> float:
    classifier = onnx_classifier(path)
    predicted = [classifier(torch.from_numpy(images[i:i + batch_size])).argmax(dim=1).numpy()
                 for i in tqdm(range(0, len(images), batch_size), desc=f"Scoring {path.name}", unit="batch")]
    return float((np.concatenate(predicted) == labels).mean())


def export(cfg: DictConfig) -> dict:
    """Export ``cfg.ckpt`` to ``cfg.output_dir``/model.onnx (and model.int8.onnx), check, score and track it."""
    from ..evaluation.evaluate import data_for, load_checkpoint

    tracking.use_store(cfg.tracking_uri, cfg.paths.mlflow_db)
    module, train_run_id = load_checkpoint(str(cfg.ckpt))
    size, stored_size = recorded_sizes(module, str(cfg.ckpt))
    hparams, out = module.hparams, Path(cfg.output_dir)
    metadata = {"cnnlab.classes": json.dumps(module.classes), "cnnlab.image_size": str(size),
                "cnnlab.stored_size": str(stored_size), "cnnlab.mean": json.dumps(list(hparams.mean)),
                "cnnlab.std": json.dumps(list(hparams.std)), "cnnlab.model": module.net.name,
                "cnnlab.input": "uint8 RGB images (N, 3, H, W), pixels 0-255; normalised inside the model",
                "cnnlab.train_run_id": train_run_id or ""}
    log.info(f"Exporting {cfg.ckpt} ({module.net.name}, {size} px) to ONNX opset {cfg.opset}")
    fp32 = export_onnx(module, out / "model.onnx", size, metadata, cfg.opset)
    difference = largest_difference(module, fp32, size)
    if difference > TOLERANCE:
        raise ConfigError(f"{fp32}: onnxruntime's logits differ from PyTorch's by up to {difference:.2e} "
                          f"(more than {TOLERANCE:g}); the export is wrong, please report it")
    log.info(f"onnxruntime agrees with PyTorch within {difference:.1e} on random images")

    datamodule = data_for(module, cfg.data, "export")
    test_images, test_labels = prepared_images(datamodule.cache.split("test"), size)
    summary = {"checkpoint": str(cfg.ckpt), "train_run_id": train_run_id, "model": module.net.name,
               "image_size": size, "opset": cfg.opset, "max_abs_difference": difference,
               "files": {"onnx": fp32.name}, "test_acc": {"onnx": onnx_accuracy(fp32, test_images, test_labels)}}
    if cfg.quantize == "int8":
        calibration, _ = prepared_images(datamodule.cache.split("train"), size, cfg.calibration_images)
        log.info(f"Quantizing to int8, calibrated on {len(calibration)} training images")
        int8 = quantize_int8(fp32, out / "model.int8.onnx", calibration, metadata)
        summary["files"]["int8"] = int8.name
        summary["test_acc"]["int8"] = onnx_accuracy(int8, test_images, test_labels)
    write_text(out / "export.json", json.dumps(summary, indent=2))
    log_to_training_run(train_run_id, summary, out)
    report(summary, len(test_labels), out)
    return summary


def log_to_training_run(train_run_id: str | None, summary: dict, out: Path) -> None:
    """The exported files and their test accuracies go to the MLflow run that trained the checkpoint."""
    if not train_run_id:
        log.warning("the checkpoint names no MLflow run (trained with logger=none): the export is not tracked")
        return
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        client.get_run(train_run_id)
    except MlflowException:
        log.warning(f"the checkpoint's MLflow run {train_run_id} is not in this store: the export is not tracked")
        return
    for name in (*summary["files"].values(), "export.json"):
        client.log_artifact(train_run_id, str(out / name), "export")
    for name, accuracy in summary["test_acc"].items():
        client.log_metric(train_run_id, f"export/{name}/test_acc", accuracy)


def report(summary: dict, images: int, out: Path) -> None:
    accuracy = summary["test_acc"]
    line = f"\nTest accuracy on {images} images: ONNX {accuracy['onnx']:.4f}"
    if "int8" in accuracy:
        line += f", int8 {accuracy['int8']:.4f} ({100 * (accuracy['int8'] - accuracy['onnx']):+.2f} points)"
    log.info(line)
    for name, file in summary["files"].items():
        log.info(f"{name}: {(out / file).resolve()} ({(out / file).stat().st_size / 1e6:.1f} MB)")
