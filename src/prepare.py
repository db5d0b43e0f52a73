"""Prepare a dataset's cache once, ahead of training: ``python src/prepare.py data=...``."""

import hydra

from cnnlab import schema
from cnnlab.cli import resolve_printed_config
from cnnlab.errors import one_line_errors


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
@one_line_errors
def main(cfg) -> None:
    schema.validate(cfg, schema.Prepare)
    # imported once the values passed: a refused one is told in a second, not after torch loads
    from cnnlab.data.sources import prepare
    prepare(cfg)


if __name__ == "__main__":
    resolve_printed_config()
    main()
