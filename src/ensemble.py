"""Average the test-set predictions of trained models (output averaging, not weight averaging):
``python src/ensemble.py 'members={a: outputs/evaluate/x, b: outputs/evaluate/y}' [average=logits]``
(each member an evaluation folder of src/evaluate.py; ``weights={a: 2, b: 1}`` for a weighted mean)."""

import hydra

from cnnlab import schema
from cnnlab.cli import resolve_printed_config
from cnnlab.errors import one_line_errors


@hydra.main(version_base="1.3", config_path="../conf", config_name="ensemble")
@one_line_errors
def main(cfg) -> None:
    schema.validate(cfg, schema.Ensemble)
    # imported once the values passed: a refused one is told in a second, not after torch loads
    from cnnlab.evaluation.ensemble import ensemble
    ensemble(cfg)


if __name__ == "__main__":
    resolve_printed_config()
    main()
