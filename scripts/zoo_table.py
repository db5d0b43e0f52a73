"""The README's table of the zoo: parameters and multiply-adds of every model at 224 px.

    python scripts/zoo_table.py > /tmp/zoo.md

Uses the counting behind src/cost.py (cnnlab.analysis.cost) on every model of ``cnnlab.list_models()``,
built on the meta device with 1000 classes.
"""

import torch

import cnnlab
from cnnlab.analysis.cost import human, stage_costs, total_row


def main(resolution: int = 224) -> None:
    print(f"| model | parameters | multiply-adds at {resolution} px |\n|---|---:|---:|")
    for name in cnnlab.list_models():
        with torch.device("meta"):
            net = cnnlab.create_model(name)
        total = total_row(stage_costs(net, resolution))
        print(f"| `{name}` | {total.params:,} | {human(total.macs)} |")


if __name__ == "__main__":
    main()
