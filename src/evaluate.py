"""Score a checkpoint on the test split with test-time views:
``python src/evaluate.py ckpt=<file or runs:/<mlflow run id>> tta=ten_crop`` (see ``--help``)."""

import hydra

from cnnlab import schema
from cnnlab.cli import resolve_printed_config
from cnnlab.errors import one_line_errors


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
@one_line_errors
def main(cfg) -> None:
    schema.validate(cfg, schema.Evaluate)
    # imported once the values passed: a refused one is told in a second, not after torch loads
    from cnnlab.evaluation.evaluate import evaluate
    evaluate(cfg)


if __name__ == "__main__":
    resolve_printed_config()
    main()
