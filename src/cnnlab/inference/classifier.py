"""A trained classifier, from a checkpoint or an exported ONNX file, behind one interface.

Both take what cnnlab's loaders give, uint8 RGB images (N, 3, H, W) with pixels 0-255, and return
logits: the normalisation travels inside the model (ImageClassifier's, and the exported graph's).
Each knows how its images were made, from the checkpoint's hyper-parameters or the ONNX metadata:
decoded to ``stored_size`` squares, then resized and centre-cropped to ``image_size``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError

ONNX_INPUT = "images"


@dataclass
class Classifier:
    """``classifier(uint8 images) -> logits``, with what preparing its images takes."""
    classes: list[str]
    image_size: int
    stored_size: int
    source: str
    train_run_id: str | None = None
    run: object = field(default=None, repr=False)  # uint8 (N, 3, H, W) tensor -> logits tensor

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.run(images)


def load_classifier(reference: str, device: str = "cpu") -> Classifier:
    """A checkpoint file, ``runs:/<run id>`` (its best checkpoint) or an exported ``.onnx`` file."""
    if str(reference).endswith(".onnx"):
        return onnx_classifier(Path(reference).expanduser())
    from ..evaluation.evaluate import load_checkpoint

    module, train_run_id = load_checkpoint(str(reference))
    image_size, stored_size = recorded_sizes(module, str(reference))
    module.eval().to(device)

    @torch.inference_mode()
    def run(images: torch.Tensor) -> torch.Tensor:
        return module(images.to(device, non_blocking=True)).float().cpu()

    return Classifier(module.classes, image_size, stored_size, str(reference), train_run_id, run)


def recorded_sizes(module, reference: str) -> tuple[int, int]:
    """(image_size, stored_size) a checkpoint's training recorded; refused for checkpoints that predate them."""
    hparams = module.hparams
    if hparams.get("image_size") is None:
        raise ConfigError(f"{reference} does not say its image size (a training older than predict.py): "
                          "train it again, or score it with src/evaluate.py on its prepared test split")
    return int(hparams.image_size), int(hparams.stored_size)


def onnx_session(path: Path):
    """An onnxruntime session of ``path`` on the best provider there is."""
    import onnxruntime as ort

    if not path.is_file():
        raise ConfigError(f"ONNX model {path} not found")
    try:
        return ort.InferenceSession(str(path), providers=ort.get_available_providers())
    except Exception as error:  # onnxruntime raises its own types for unreadable or invalid files
        raise ConfigError(f"{path} is not a model onnxruntime can run: {str(error).splitlines()[0]}") from None


def onnx_runner(session):
    """uint8 images (tensor) -> logits (tensor), through ``session``."""
    def run(images: torch.Tensor) -> torch.Tensor:
        [logits] = session.run(None, {ONNX_INPUT: np.ascontiguousarray(images.numpy())})
        return torch.from_numpy(logits)

    return run


def onnx_classifier(path: Path) -> Classifier:
    """An exported model (src/export.py) run by onnxruntime; its metadata says what it expects."""
    session = onnx_session(path)
    meta = session.get_modelmeta().custom_metadata_map
    if "cnnlab.classes" not in meta:
        raise ConfigError(f"{path} was not exported by cnnlab (its metadata has no cnnlab.classes)")
    run = onnx_runner(session)
    return Classifier(json.loads(meta["cnnlab.classes"]), int(meta["cnnlab.image_size"]),
                      int(meta["cnnlab.stored_size"]), str(path), meta.get("cnnlab.train_run_id") or None, run)
