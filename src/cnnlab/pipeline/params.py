"""params.yaml is conf/pipeline.yaml composed by Hydra, exactly as ``dvc exp run`` composes it.

``python -m cnnlab.pipeline.params [KEY=VALUE ...]`` (``make params``) writes it for ``dvc repro``
after an edit of conf/pipeline.yaml; ``dvc exp run -S KEY=VALUE`` does the same itself, with
DVC's Hydra composition enabled in .dvc/config.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import OmegaConf

CONFIG_NAME = "pipeline"
PARAMS_FILE = "params.yaml"


def compose(config_dir: str | Path = "conf", overrides: Sequence[str] = ()) -> str:
    """The text of params.yaml: the steps of dvc.utils.hydra.compose_and_dump, so the two agree to the byte."""
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base=None):
        cfg = hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides))
    OmegaConf.resolve(cfg)
    return OmegaConf.to_yaml(cfg)


def main(argv: Sequence[str] | None = None) -> None:
    overrides = list(sys.argv[1:] if argv is None else argv)
    Path(PARAMS_FILE).write_text(compose("conf", overrides), encoding="utf-8")
    print(f"Wrote {PARAMS_FILE} from conf/{CONFIG_NAME}.yaml{' with ' + ' '.join(overrides) if overrides else ''}")


if __name__ == "__main__":
    main()
