"""The MLflow model's code ("models from code"): MLflow runs this file to make the model it loads, so
nothing is unpickled. Its checkpoint is the model's artifact; cnnlab itself travels in its code paths."""

from mlflow.models import set_model

from cnnlab.inference.mlflow_model import ImageClassifierModel

set_model(ImageClassifierModel())
