"""A trained model as a product: prediction on a user's images, ONNX export, MLflow models."""
