"""Average the test-set predictions of trained models (output averaging, not weight averaging):
``python src/ensemble.py 'members={a: outputs/evaluate/x, b: outputs/evaluate/y}' [average=logits]``
(each member an evaluation folder of src/evaluate.py; ``weights={a: 2, b: 1}`` for a weighted mean)."""

import hydra

from cnnlab.errors import one_line_errors
from cnnlab.evaluation.ensemble import ensemble


@hydra.main(version_base="1.3", config_path="../conf", config_name="ensemble")
@one_line_errors
def main(cfg) -> None:
    ensemble(cfg)


if __name__ == "__main__":
    main()
