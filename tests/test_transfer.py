"""Pretrain on shapes, fine-tune the softmax layer on shapes_fewshot: better than learning from scratch."""

import json

import pytest
from mlflow.tracking import MlflowClient

from conftest import run_script

pytestmark = pytest.mark.slow

# A small setting: a short pretraining of a half-width model (about a minute on 2 cores) and
# the default few-shot task (20 training images per class, 100 test images per class).
COMMON = ["data.num_workers=0", "model.width_mult=0.5", "optimizer.lr=5e-3"]
PRETRAIN = ["data.source.train_size=4000", "data.source.val_size=200", "data.source.test_size=200",
            "trainer.max_epochs=6"]
FEWSHOT = ["data=shapes_fewshot", "trainer.max_epochs=30"]


def test_fine_tuning_a_pretrained_trunk_beats_learning_from_scratch(tmp_path):
    def train(name, *overrides):
        run_dir = tmp_path / "runs" / name
        result = run_script("train.py", f"paths.root_dir={tmp_path}", f"hydra.run.dir={run_dir}", f"run_name={name}",
                            *COMMON, *overrides, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((run_dir / "metrics.json").read_text())["test/acc"], result

    pretrained, _ = train("pretrain", *PRETRAIN)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (pretrain,) = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    fine_tuned, result = train("fine_tuned", *FEWSHOT, f"model.pretrained=runs:/{pretrain.info.run_id}", "freeze=all_but_head")
    assert "cached the frozen trunk's features" in result.stdout + result.stderr
    scratch, _ = train("scratch", *FEWSHOT)
    random_trunk, _ = train("random_trunk", *FEWSHOT, "freeze=all_but_head")  # the same head on a trunk that never learned
    print(f"pretrained {pretrained:.3f}; fine-tuned {fine_tuned:.3f}, scratch {scratch:.3f}, frozen random trunk {random_trunk:.3f}")
    assert fine_tuned > scratch + 0.05 and fine_tuned > random_trunk + 0.05
