"""A checkpoint as an ONNX model (optionally int8), checked against PyTorch:
``python src/export.py ckpt=<file or runs:/<mlflow run id>> [quantize=int8]`` (see ``--help``)."""

import hydra

from cnnlab import schema
from cnnlab.cli import resolve_printed_config
from cnnlab.errors import one_line_errors


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
@one_line_errors
def main(cfg) -> None:
    schema.validate(cfg, schema.Export)
    # imported once the values passed: a refused one is told in a second, not after torch loads
    from cnnlab.inference.export import export
    export(cfg)


if __name__ == "__main__":
    resolve_printed_config()
    main()
