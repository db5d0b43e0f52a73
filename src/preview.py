"""Draw what an augmentation policy does: ``python src/preview.py augment=heavy data=...``."""

import hydra

from cnnlab.data.preview import write_previews
from cnnlab.errors import one_line_errors


@hydra.main(version_base="1.3", config_path="../conf", config_name="preview")
@one_line_errors
def main(cfg) -> None:
    write_previews(cfg)


if __name__ == "__main__":
    main()
