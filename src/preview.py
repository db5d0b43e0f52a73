"""Draw what an augmentation policy does: ``python src/preview.py augment=heavy data=...``."""

import hydra

from cnnlab import schema
from cnnlab.cli import resolve_printed_config
from cnnlab.errors import one_line_errors


@hydra.main(version_base="1.3", config_path="../conf", config_name="preview")
@one_line_errors
def main(cfg) -> None:
    schema.validate(cfg, schema.Preview)
    # imported once the values passed: a refused one is told in a second, not after torch loads
    from cnnlab.data.preview import write_previews
    write_previews(cfg)


if __name__ == "__main__":
    resolve_printed_config()
    main()
