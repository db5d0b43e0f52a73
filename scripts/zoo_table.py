"""The README's table of the zoo: parameters and multiply-adds of every model at 224 px.

    python scripts/zoo_table.py > /tmp/zoo.md

Uses the counting behind src/cost.py (cnnlab.analysis.cost) on every conf/model/*.yaml, built on
the meta device with 1000 classes.
"""

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from cnnlab.analysis.cost import human, stage_costs, total_row

CONF = Path(__file__).resolve().parents[1] / "conf"


def main(resolution: int = 224) -> None:
    print(f"| model | parameters | multiply-adds at {resolution} px |\n|---|---:|---:|")
    for name in sorted(p.stem for p in (CONF / "model").glob("*.yaml")):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=[f"model={name}"])
        with torch.device("meta"):
            net = instantiate(cfg.model, num_classes=1000)
        total = total_row(stage_costs(net, resolution))
        print(f"| `{name}` | {total.params:,} | {human(total.macs)} |")


if __name__ == "__main__":
    main()
