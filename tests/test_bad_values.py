"""Bad config values are refused in one line before any work (src/cnnlab/schema.py), and no shipped
config is refused.

Each bad value goes through the real entry script, as a user types it: exit status 2, one line on
stderr that names the key and the value, no traceback, and nothing left behind in its root: no
prepared data and no MLflow run.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from conftest import CONF_DIR, run_script

MISSING = "/no/such/file.ckpt"
OFFLINE = "+data.source.url=http://127.0.0.1:9/cifar-10-python.tar.gz"  # refused at once, online or not

# (script, overrides, what the error line must contain: the key and the value, or the path to fix)
BAD = [
    ("train.py", ["data.batch_size=0"], "data.batch_size=0: must be an integer >= 1"),
    ("train.py", ["data.batch_size=-4"], "data.batch_size=-4: must be an integer >= 1"),
    ("train.py", ["data.eval_batch_size=0"], "data.eval_batch_size=0: must be an integer >= 1, or null"),
    ("train.py", ["seed=abc"], "seed=abc: must be an integer"),
    ("train.py", ["label_smoothing=1.5"], "label_smoothing=1.5: must be a number in [0, 1)"),
    ("train.py", ["trainer.max_epochs=0"], "trainer.max_epochs=0: must be an integer >= 1"),
    ("train.py", ["trainer.devices=0"], "trainer.devices=0: must be"),
    ("train.py", ["trainer.accelerator=gpux"], "trainer.accelerator=gpux: must be cpu, gpu, cuda, mps, tpu or auto"),
    ("train.py", ["trainer.precision=8"], "trainer.precision=8: must be 32-true, 16-mixed"),
    ("train.py", [f"resume={MISSING}"],
     f"resume={MISSING}: must be a run folder (holding checkpoints/last.ckpt), a checkpoint file, "
     "runs:/<MLflow run id>, auto, or null"),
    ("train.py", ["scaling.width=-1"], "scaling.width=-1: must be a number > 0"),
    ("train.py", ["+tta=flip"], "must be absent: test-time views are src/evaluate.py's"),
    ("train.py", ["scaling.depth=0"], "scaling.depth=0: must be a number > 0"),
    ("train.py", ["data=cifar10", OFFLINE], "put cifar-10-python.tar.gz at "),
    ("train.py", ["freeze=stages", "freeze.depth=4"], "freeze.depth=4: must be an integer from 0 to 3"),
    ("train.py", ["freeze=all_but_head", "freeze.depth=1"], "freeze.cache_features=true: must be false unless"),
    ("train.py", ["freeze=gradual", "freeze.unfreeze_at=[4,2]"], "freeze.unfreeze_at=[4,2]: must be a list of"),
    ("train.py", ["freeze=gradual", "freeze.backbone_lr_factor=0"], "freeze.backbone_lr_factor=0: must be"),
    ("train.py", ["model=vgg11", "data.image_size=16"], "data.image_size=16: must be an integer >= 32"),
    ("train.py", ["model.dropout=1.5"], "model.dropout=1.5: must be a number in [0, 1]"),
    ("train.py", ["mlflow_model.log=yes"], "mlflow_model.log=yes: must be true or false"),
    ("train.py", ["model=googlenet", "model.pretrained=imagenet1k"],
     "model.pretrained=imagenet1k: must be null, false, imagenet (this model's published weights), a file"),
    ("train.py", ["augment=light", "augment.mirror.p=2"], "augment.mirror.p=2: must be a number in [0, 1]"),
    ("train.py", ["optimizer.lr=0"], "optimizer.lr=0: must be a number > 0"),
    ("train.py", ["optimizer.weight_decay=-0.1"], "optimizer.weight_decay=-0.1: must be a number >= 0"),
    ("train.py", ["scheduler=one_cycle", "scheduler.pct_start=1.5"], "scheduler.pct_start=1.5: must be"),
    ("train.py", ["data.num_workers=-1"], "data.num_workers=-1: must be an integer >= 0, or null"),
    ("train.py", ["data.std=[0.25,0,0.25]"], "data.std=[0.25,0,0.25]: must be a list of 3 numbers > 0"),
    ("train.py", ["data.mean=[0.5,0.5]"], "data.mean=[0.5,0.5]: must be a list of 3 numbers"),
    ("train.py", ["data.source.val_size=0"], "data.source.val_size=0: must be an integer >= 1"),
    ("train.py", ["data=imagefolder", "data.source.root=/no/such/folder"],
     "data.source.root=/no/such/folder: must be an existing folder"),
    ("evaluate.py", [f"ckpt={MISSING}"], f"ckpt={MISSING}: must be an existing checkpoint file or runs:/"),
    ("predict.py", [f"ckpt={MISSING}.onnx", "images=."],
     f"ckpt={MISSING}.onnx: must be an existing checkpoint file, runs:/<mlflow run id> or an exported .onnx file"),
    ("predict.py", ["ckpt=runs:/0123abcd", f"images={MISSING}"], f"images={MISSING}: must be an existing image file"),
    ("predict.py", ["ckpt=runs:/0123abcd", "images=.", "top_k=0"], "top_k=0: must be an integer >= 1"),
    ("export.py", ["ckpt=runs:/0123abcd", "quantize=int4"], "quantize=int4: must be null or int8"),
    ("export.py", ["ckpt=runs:/0123abcd", "opset=17"], "opset=17: must be an integer >= 18"),
    ("evaluate.py", ["ckpt=runs:/0123abcd", "evaluate.batch_size=0"], "evaluate.batch_size=0: must be"),
    ("evaluate.py", ["ckpt=runs:/0123abcd", "tta=five_crop", "tta.crops=3"], "tta.crops=3: must be 1"),
    ("evaluate.py", ["ckpt=runs:/0123abcd", "tta=five_crop", "tta.scales=[0.5]"], "tta.scales=[0.5]: must be"),
    ("ensemble.py", ["experiment=", "+members.a=/no/such/folder"], "experiment=: must be a non-empty string"),
    ("ensemble.py", ["+members.a=/no/such/folder"], "member 'a' (/no/such/folder): no such folder"),  # ensemble.py's
    ("prepare.py", ["data.source.train_size=0"], "data.source.train_size=0: must be an integer >= 1"),
    ("prepare.py", ["data.source.seed=-1"], "data.source.seed=-1: must be an integer from 0"),
    ("prepare.py", ["data=shapes_fewshot", "data.source._target_=cnnlab.data.ShapesFirstPerClass",
                    "+data.source.per_class=0"], "data.source.per_class=0: must be an integer >= 1"),
    ("prepare.py", ["data=imagefolder", "data.source.root=/no/such/folder"], "data.source.root=/no/such/folder"),
    ("prepare.py", ["data=cifar10", "data.source.val_size=50000"], "data.source.val_size=50000: must be"),
    ("cost.py", ["scaling.width=-1"], "scaling.width=-1: must be a number > 0"),
    ("cost.py", ["scaling.depth=0"], "scaling.depth=0: must be a number > 0"),
    ("cost.py", ["scaling=custom", "scaling.phi=abc"], "scaling.phi=abc: must be a number"),
    ("cost.py", ["model=vgg16", "cost.resolution=16"], "cost.resolution=16: must be an integer >= 32"),
    ("cost.py", ["cost.num_classes=0"], "cost.num_classes=0: must be an integer >= 1"),
    ("preview.py", ["preview.tile=0"], "preview.tile=0: must be an integer >= 1"),
]


def case_id(case) -> str:
    script, overrides, _ = case
    return f"{script.removesuffix('.py')}:{' '.join(o for o in overrides if o != OFFLINE)}"


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    """Every bad value's script run, two at a time (each is a fresh Python), in a root of its own."""
    base = tmp_path_factory.mktemp("bad_values")

    def refuse(numbered):
        number, (script, overrides, _) = numbered
        root = base / str(number)
        return root, run_script(script, f"paths.root_dir={root}", *overrides, timeout=120)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(map(case_id, BAD), pool.map(refuse, enumerate(BAD))))


def runs_in_store(root: Path) -> list:
    """The MLflow runs in the root's store; none where the store was never created."""
    db = root / "mlflow.db"
    if not db.exists():
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD, ids=map(case_id, BAD))
def test_a_bad_value_is_one_line_before_any_work(refusals, case):
    root, result = refusals[case_id(case)]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr[-3000:]
    assert case[2] in lines[0]
    assert not list(root.glob("data/*")) and not list(root.glob("data/.*")), "data was prepared"  # (the lock's folder may stay)
    assert runs_in_store(root) == [], "an MLflow run was created"


# Good values: every shipped option passes, so the schema never refuses a config that works.

def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def validate_composed(config: str, schema, *overrides: str) -> None:
    """Compose as the script would (with Hydra's own config, for ${hydra:...}) and validate."""
    from cnnlab import schema as schemas

    cfg = compose(config, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    schemas.validate(cfg, schema)


def test_every_script_default_config_passes_validation():
    from cnnlab.schema import Cost, Ensemble, Evaluate, Prepare, Preview, Report, Train

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for config, schema in [("config", Train), ("config", Prepare), ("preview", Preview), ("cost", Cost),
                               ("ensemble", Ensemble), ("report", Report)]:
            validate_composed(config, schema)
        validate_composed("evaluate", Evaluate, "ckpt=runs:/0123abcd")


@pytest.mark.slow
def test_every_shipped_option_passes_validation(tmp_path):
    from cnnlab.schema import Cost, Evaluate, Train

    images = tmp_path / "images"
    images.mkdir()
    choices = [f"{group}={option}" for group in ("augment", "freeze", "scheduler", "optimizer", "scaling",
                                                  "trainer", "logger") for option in options(group)]
    choices += [f"data={option}" for option in options("data") if option != "imagefolder"]
    choices += [f"data=imagefolder data.source.root={images}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for choice in choices:
            validate_composed("config", Train, *choice.split())
        for model in options("model"):
            validate_composed("config", Train, f"model={model}")
            validate_composed("cost", Cost, f"model={model}")
        for scaling in options("scaling"):
            validate_composed("config", Train, "model=efficientnet", f"scaling={scaling}")
        for tta in options("tta"):
            validate_composed("evaluate", Evaluate, "ckpt=runs:/0123abcd", f"tta={tta}")
