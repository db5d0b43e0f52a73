"""Score a checkpoint on the test split with test-time views:
``python src/evaluate.py ckpt=<file or runs:/<mlflow run id>> tta=ten_crop`` (see ``--help``)."""

import hydra

from cnnlab.errors import one_line_errors
from cnnlab.evaluation.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
@one_line_errors
def main(cfg) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
