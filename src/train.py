"""Train one model: ``python src/train.py model=... data=... augment=...`` (see ``--help``)."""

import hydra

from cnnlab.errors import one_line_errors
from cnnlab.training.run import train


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
@one_line_errors
def main(cfg) -> float:
    return train(cfg)


if __name__ == "__main__":
    main()
