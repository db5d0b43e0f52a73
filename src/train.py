"""Train one model: ``python src/train.py model=... data=... augment=...`` (see ``--help``)."""

import hydra

from cnnlab import schema
from cnnlab.cli import resolve_printed_config
from cnnlab.errors import one_line_errors


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
@one_line_errors
def main(cfg) -> float:
    schema.validate(cfg, schema.Train)
    # imported once the values passed: a refused one is told in a second, not after torch loads
    from cnnlab.training.run import train
    return train(cfg)


if __name__ == "__main__":
    resolve_printed_config()
    main()
