"""A training's best checkpoint as an MLflow model: a pyfunc that takes image files and gives classes.

Logged into the training's run as ``model`` and registered under ``mlflow_model.registered_name``, so
``mlflow models serve -m models:/<name>/<version> --env-manager local`` answers on images, and
``mlflow.pyfunc.load_model(...)`` predicts in Python. Its input is a table with one column, ``image``:
the bytes of image files (base64 in a served request's JSON), decoded and prepared as ``predict.py``
prepares them. Its output has the most probable ``class``, its ``probability`` and the
``probabilities`` of every class, in the order of the model's classes (its metadata lists them).
"""

from __future__ import annotations

import io
import logging
from importlib.metadata import version
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

# what the model needs where it is served, at the versions it was logged with
REQUIREMENTS = ("torch", "pytorch-lightning", "torchmetrics", "hydra-core", "omegaconf", "albumentations",
                "opencv-python-headless", "pillow", "numpy", "safetensors", "pandas", "mlflow")


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from ..data.augment import tta_views
        from .classifier import load_classifier

        self.classifier = load_classifier(context.artifacts["checkpoint"])
        self.views = tta_views(self.classifier.image_size)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        import torch

        from ..data.imagefolder import read_image
        from ..errors import ConfigError
        from .predict import mean_probabilities, views_of

        images = []
        for row, data in enumerate(model_input["image"]):
            image, error = read_image(io.BytesIO(bytes(data)), self.classifier.stored_size)
            if image is None:
                raise ConfigError(f"image {row} cannot be read: {error}")
            images.append(views_of(image, self.views))
        probabilities = mean_probabilities(self.classifier, torch.stack(images)).numpy()
        best = probabilities.argmax(axis=1)
        return pd.DataFrame({"class": [self.classifier.classes[i] for i in best],
                             "probability": probabilities.max(axis=1).astype(float),
                             "probabilities": [row.astype(float).tolist() for row in probabilities]})


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    return ModelSignature(inputs=Schema([ColSpec(DataType.binary, "image")]),
                          outputs=Schema([ColSpec(DataType.string, "class"), ColSpec(DataType.double, "probability"),
                                          ColSpec(Array(DataType.double), "probabilities")]))


def example_image(image) -> bytes:
    """A PNG of one image (an (H, W, 3) uint8 array): the input example MLflow stores and checks the model with."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def log_model(run_id: str, checkpoint: str | Path, classes: list[str], example: bytes,
              registered_name: str | None) -> str | None:
    """Log ``checkpoint`` into the run ``run_id`` as its ``model``; register it under ``registered_name``
    (if given) and return the version.

    The model is logged from code (``pyfunc_code.py``), not pickled: loading it runs no code from the
    store, as checkpoints are read without it. Registration is ours rather than MLflow's
    ``registered_model_name``, which says "already exists" on every version after the first."""
    from mlflow.models import Model

    import cnnlab

    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    pyfunc_log.setLevel(logging.WARNING)  # it announces each check of the input example
    try:
        info = Model.log(None, name="model", flavor=mlflow.pyfunc, run_id=run_id,
                         python_model=str(Path(__file__).with_name("pyfunc_code.py")),
                         artifacts={"checkpoint": str(checkpoint)}, code_paths=[str(Path(cnnlab.__file__).parent)],
                         signature=signature(), input_example=pd.DataFrame({"image": [example]}),
                         metadata={"classes": classes},
                         pip_requirements=[f"{name}=={version(name)}" for name in REQUIREMENTS])
    finally:
        pyfunc_log.setLevel(level)
    return register(info, run_id, registered_name) if registered_name else None


def register(info, run_id: str, name: str) -> str:
    """A new version of the registered model ``name`` (created if missing, also by another process at once)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return client.create_model_version(name, info.model_uri, run_id=run_id, model_id=info.model_id).version
