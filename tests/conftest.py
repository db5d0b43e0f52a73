import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"


def tiny_overrides(root: Path) -> list[str]:
    """A run small enough for a test: 64 training images, one epoch, no worker processes."""
    return [
        f"paths.root_dir={root}",
        "data.source.train_size=64",
        "data.source.val_size=32",
        "data.source.test_size=32",
        "data.batch_size=16",
        "data.num_workers=0",
        "trainer.max_epochs=1",
    ]


def run_script(script: str, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run one of our entry scripts the way a user does, from the project root."""
    environment = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # only what the test sets
    environment.update({"NO_ALBUMENTATIONS_UPDATE": "1", **(env or {})})
    return subprocess.run([sys.executable, f"src/{script}", *args], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def compose():
    """Compose the project's config with overrides, as `python src/train.py` would (another script's: config_name)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    def _compose(*overrides: str, return_hydra_config: bool = False, config_name: str = "config"):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)

    return _compose
