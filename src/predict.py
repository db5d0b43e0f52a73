"""The top classes of your own images:
``python src/predict.py ckpt=<file, runs:/<mlflow run id> or .onnx> images=<file or folder>`` (see ``--help``)."""

import hydra

from cnnlab import schema
from cnnlab.cli import resolve_printed_config
from cnnlab.errors import one_line_errors


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
@one_line_errors
def main(cfg) -> None:
    schema.validate(cfg, schema.Predict)
    # imported once the values passed: a refused one is told in a second, not after torch loads
    from cnnlab.inference.predict import predict
    predict(cfg)


if __name__ == "__main__":
    resolve_printed_config()
    main()
