"""What a model costs per stage: ``python src/cost.py model=resnet50 cost.resolution=224``
(output shape, parameters, multiply-adds; ``cost.output=table.csv|table.md`` writes it too)."""

import hydra

from cnnlab import schema
from cnnlab.cli import resolve_printed_config
from cnnlab.errors import one_line_errors


@hydra.main(version_base="1.3", config_path="../conf", config_name="cost")
@one_line_errors
def main(cfg) -> None:
    schema.validate(cfg, schema.Cost)
    # imported once the values passed: a refused one is told in a second, not after torch loads
    from cnnlab.analysis.cost import report
    report(cfg)


if __name__ == "__main__":
    resolve_printed_config()
    main()
