"""The main DVC pipeline (dvc.yaml): its params, and a tiny pipeline run end to end with real `dvc`
commands in a temporary git repository, read back from its MLflow store."""

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from mlflow.tracking import MlflowClient

from cnnlab import tracking
from cnnlab.pipeline.params import compose
from conftest import CONF_DIR, ROOT
from dvc_repo import commit_all, copy_project, dvc, git, merge, stage_keys, stages_run

DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


# --- params.yaml and dvc.yaml, without running anything ------------------------------------------

def test_params_yaml_is_conf_pipeline_composed_as_dvc_composes_it(tmp_path):
    from dvc.utils.hydra import compose_and_dump

    composed = compose(CONF_DIR)
    assert (ROOT / "params.yaml").read_text() == composed, "params.yaml is stale: run `make params`"
    compose_and_dump(tmp_path / "params.yaml", str(CONF_DIR), None, "pipeline", str(ROOT), [])
    assert (tmp_path / "params.yaml").read_text() == composed  # what `dvc exp run` writes, to the byte


def test_dvc_composes_params_yaml_from_conf_pipeline():
    from dvc.repo import Repo

    hydra = Repo(str(ROOT)).config["hydra"]
    assert hydra["enabled"] and hydra["config_name"] == "pipeline" and hydra.get("config_dir", "conf") == "conf"


@pytest.mark.parametrize("name", list(DVC_YAML["stages"]))
def test_each_stage_lists_exactly_the_params_its_command_uses(name):
    used, listed = stage_keys(name, DVC_YAML["stages"][name])
    covered = {key for key in used if any(key == p or key.startswith(p + ".") for p in listed)}
    assert covered == used, f"{name}: its command uses {sorted(used - covered)}, which params: does not list"
    unused = {p for p in listed if not any(key == p or key.startswith(p + ".") for key in used)}
    assert not unused, f"{name}: params: lists {sorted(unused)}, which its command does not use"


def test_the_ensemble_stage_averages_exactly_the_members_in_params():
    # src/ensemble.py takes a name -> folder mapping, which DVC cannot build from params: dvc.yaml
    # spells it out, and this keeps it in step with params.yaml.
    stage = DVC_YAML["stages"]["ensemble"]
    overrides = OverridesParser.create().parse_overrides(
        [o.strip("'") for o in re.findall(r"'members=[^']*'", stage["cmd"])])
    members = overrides[0].value()
    assert sorted(members) == sorted(PARAMS["members"])
    assert members == {name: f"results/evaluate/{name}" for name in PARAMS["members"]}
    assert {f"results/evaluate/{name}" for name in PARAMS["members"]} <= set(stage["deps"])


def test_config_hash_follows_what_a_run_computes_not_where_it_goes(run_config):
    base = tracking.config_hash(run_config())
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert tracking.config_hash(run_config("paths.root_dir=/elsewhere", "experiment=x", "+tags.cnnlab.member=a",
                                           "hydra.run.dir=/tmp/other")) == base
    assert tracking.config_hash(run_config("seed=1")) != base
    assert tracking.config_hash(run_config("model=resnet18")) != base


def test_run_tags_take_the_config_tags_and_dvc_stage(run_config, monkeypatch):
    cfg = run_config("+tags.cnnlab.stage=pretrain", "+tags.cnnlab.member=a", "+tags.team=vision")
    monkeypatch.setenv("DVC_STAGE", "train@a")
    monkeypatch.setenv("DVC_EXP_NAME", "tidy-frog")
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    tags = tracking.run_tags(cfg, "train", "python src/train.py", {"cnnlab.ensemble.run_id": "abc"})
    assert tags["cnnlab.stage"] == "pretrain"  # the config's tags win over the script's stage
    assert tags["cnnlab.member"] == "a" and tags["team"] == "vision"
    assert tags["cnnlab.command"] == "python src/train.py" and tags["cnnlab.ensemble.run_id"] == "abc"
    assert tags["cnnlab.dvc.stage"] == "train@a" and tags["cnnlab.dvc.exp_name"] == "tidy-frog"
    assert "cnnlab.dvc.baseline_rev" not in tags
    assert tags["cnnlab.config_hash"] == tracking.config_hash(cfg)


# --- a tiny pipeline, run with dvc --------------------------------------------------------------

TINY = {"num_workers": 0,
        "data": {"source": {"train_size": 64, "val_size": 32, "test_size": 32},
                 "target": {"train_size": 24, "val_size": 12, "test_size": 24}},
        "pretrain": {"max_epochs": 1},
        "members": {"a": {"max_epochs": 1}, "b": {"max_epochs": 1}}}
MEMBER_STAGES = {"train@a", "evaluate@a", "ensemble", "report", "export@a"}


def project_copy(root: Path) -> Path:
    """The project's code in a new git repository, with a tiny conf/pipeline.yaml: a project before its
    first `dvc repro` (the committed results of the default pipeline stay behind)."""
    copy_project(root)
    config = yaml.safe_load((root / "conf" / "pipeline.yaml").read_text())
    merge(config, TINY)
    (root / "conf" / "pipeline.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (root / "params.yaml").write_text(compose(root / "conf"))
    commit_all(root, "tiny pipeline")
    return root


ALL_STAGES = {"prepare@source", "prepare@target", "pretrain", "train@a", "train@b", "evaluate@a", "evaluate@b",
              "ensemble", "report", "export@a", "export@b"}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The tiny pipeline's life: repro, repro again, then one member changed with -S in a queued experiment."""
    repo = project_copy(tmp_path_factory.mktemp("pipeline"))
    steps = {"repro": dvc(repo, "repro")}
    steps["commit"] = git(repo, "rev-parse", "HEAD")
    steps["metrics"] = json.loads(dvc(repo, "metrics", "show", "--json").stdout)
    steps["status"] = dvc(repo, "status")
    steps["again"] = dvc(repo, "repro")
    steps["untracked"] = git(repo, "status", "--porcelain", "--untracked-files=all").split("\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "tiny pipeline: results")  # what dvc repro then tells you to do
    # A queued experiment runs in a copy under .dvc/tmp/exps: its runs must still reach the project's store.
    # Another model cannot start from the pretrained resnet_small's weights: this member starts from scratch.
    dvc(repo, "exp", "run", "--queue", "-S", "members.a.model=resnet18", "-S", "members.a.pretrained=false")
    steps["member"] = dvc(repo, "exp", "run", "--run-all")
    steps["experiments"] = dvc(repo, "exp", "show", "--json").stdout
    return repo, steps


def runs(repo: Path, stage: str | None = None):
    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    experiment = client.get_experiment_by_name("pipeline")
    query = f"tags.`cnnlab.stage` = '{stage}'" if stage else ""
    return client, client.search_runs([experiment.experiment_id], query, order_by=["attributes.start_time ASC"])


@pytest.mark.slow
def test_repro_runs_every_stage_and_writes_metrics_and_plots(pipeline):
    repo, steps = pipeline
    assert stages_run(steps["repro"]) == ALL_STAGES
    assert "Data and pipelines are up to date" in steps["status"].stdout
    metrics = steps["metrics"][""]["data"]
    assert 0 <= metrics["results/pretrain/metrics.json"]["data"]["test/acc"] <= 1
    for member in ("a", "b"):
        evaluation = metrics[f"results/evaluate/{member}/metrics.json"]["data"]
        assert set(evaluation) == {"none", PARAMS["evaluate"]["tta"]}
        assert (repo / f"results/train/{member}/checkpoints/best.ckpt").is_file()
        assert (repo / f"results/train/{member}/history.csv").read_text().startswith("epoch,")
    assert set(metrics["results/ensemble/metrics.json"]["data"]) == {"a", "b", "ensemble"}
    for member in ("a", "b"):  # the exported model scores on the test split what PyTorch scored in evaluation
        exported = metrics[f"results/export/{member}/export.json"]["data"]
        evaluated = metrics[f"results/evaluate/{member}/metrics.json"]["data"]
        assert exported["test_acc"]["onnx"] == pytest.approx(evaluated["none"]["acc"])
        assert 0 <= exported["test_acc"]["int8"] <= 1 and (repo / f"results/export/{member}/model.int8.onnx").is_file()
    report = (repo / "results/report/report.md").read_text()
    assert "| a |" in report and "![" in report and (repo / "results/report/report.html").is_file()
    plots = dvc(repo, "plots", "show", "-o", str(repo / "plots_out"))
    assert (repo / "plots_out" / "index.html").is_file(), plots.stdout
    # big and per-image outputs in the DVC cache (git-ignored), summaries for git, Hydra's files nowhere
    cached = ["results/data/source", "results/train/a/checkpoints", "results/evaluate/a/evaluation.json",
              "results/evaluate/a/predictions.csv", "results/ensemble/members.md"]
    summaries = ["results/train/a/metrics.json", "results/train/a/history.csv", "results/evaluate/a/per_class.csv",
                 "results/ensemble/metrics.json", "results/report/report.md"]
    ignored = subprocess.run(["git", "check-ignore", *cached, *summaries], cwd=repo, capture_output=True,
                             text=True).stdout.split()
    assert ignored == cached
    new_files = {line[3:] for line in steps["untracked"]}
    assert set(summaries) <= new_files and "dvc.lock" in new_files
    assert not [name for name in new_files if "/.hydra/" in name or name.endswith(".log")]


@pytest.mark.slow
def test_second_repro_is_a_no_op(pipeline):
    _, steps = pipeline
    assert stages_run(steps["again"]) == set()
    assert "Data and pipelines are up to date" in steps["again"].stdout


SCRIPTS = {"prepare": "prepare.py", "pretrain": "train.py", "train": "train.py", "evaluate": "evaluate.py",
           "ensemble": "ensemble.py", "report": "report.py"}


@pytest.mark.slow
def test_each_stage_is_one_tagged_run_in_one_experiment(pipeline):
    repo, steps = pipeline
    client, found = runs(repo)
    first = [run for run in found if "cnnlab.dvc.exp_name" not in run.data.tags]  # those of `dvc repro`
    by_stage = {}
    for run in first:  # every script's run opened, tagged and closed alike (tracking.tracked_run)
        tags = run.data.tags
        by_stage.setdefault(tags["cnnlab.stage"], []).append(run)
        assert run.info.status == "FINISHED"
        assert {"cnnlab.command", "cnnlab.config_hash", "cnnlab.run_folder", "cnnlab.dvc.stage",
                "cnnlab.git_dirty"} <= set(tags), (tags["cnnlab.stage"], sorted(tags))
        assert tags["cnnlab.command"].startswith(f"python src/{SCRIPTS[tags['cnnlab.stage']]} ")
        assert (repo / tags["cnnlab.run_folder"]).resolve().is_relative_to(repo / "results")
        assert tags["mlflow.source.git.commit"] == steps["commit"]
        assert re.fullmatch(r"[0-9a-f]{64}", tags["cnnlab.config_hash"])
        assert run.info.artifact_uri.startswith((repo / "mlartifacts").as_uri())
    assert {stage: len(r) for stage, r in by_stage.items()} == {"prepare": 2, "pretrain": 1, "train": 2,
                                                               "evaluate": 2, "ensemble": 1, "report": 1}
    assert sorted(r.data.tags["cnnlab.member"] for r in by_stage["train"]) == ["a", "b"]
    assert sorted(r.data.tags["cnnlab.dvc.stage"] for r in by_stage["evaluate"]) == ["evaluate@a", "evaluate@b"]
    train = {r.data.tags["cnnlab.member"]: r.info.run_id for r in by_stage["train"]}
    evaluate = {r.data.tags["cnnlab.member"]: r for r in by_stage["evaluate"]}
    for member, run in evaluate.items():  # each evaluation names the training it scored
        assert run.data.tags["cnnlab.train_run_id"] == train[member]
    for stage in ("ensemble", "report"):
        tags = by_stage[stage][0].data.tags
        for member in ("a", "b"):
            assert tags[f"cnnlab.member.{member}.run_id"] == evaluate[member].info.run_id
            assert tags[f"cnnlab.member.{member}.train_run_id"] == train[member]
    report = by_stage["report"][0].data.tags
    assert report["cnnlab.pretrain.run_id"] == by_stage["pretrain"][0].info.run_id
    assert report["cnnlab.ensemble.run_id"] == by_stage["ensemble"][0].info.run_id
    artifacts = {a.path for a in client.list_artifacts(train["a"], "best")}
    assert "best/best.ckpt" in artifacts  # the checkpoint DVC caches is also the run's artifact
    assert {a.path for a in client.list_artifacts(evaluate["a"].info.run_id)} >= {"predictions.csv", "metrics.json"}


@pytest.mark.slow
def test_a_member_change_reruns_only_its_stages_and_changes_what_trains(pipeline):
    repo, steps = pipeline
    assert stages_run(steps["member"]) == MEMBER_STAGES
    _, trained = runs(repo, "train")
    changed = [r for r in trained if r.data.tags.get("cnnlab.dvc.exp_name")]
    assert len(changed) == 1
    assert changed[0].data.tags["cnnlab.member"] == "a" and changed[0].data.tags["cnnlab.dvc.stage"] == "train@a"
    assert changed[0].data.params["model.name"] == "resnet18"
    assert changed[0].data.params["model.pretrained"] == "False"
    assert changed[0].data.tags["cnnlab.dvc.exp_name"] in steps["experiments"]


@pytest.mark.slow
def test_a_queued_experiment_logs_into_the_projects_store(pipeline):
    repo, _ = pipeline
    _, found = runs(repo)
    queued = [r for r in found if r.data.tags.get("cnnlab.dvc.exp_name")]
    assert sorted(r.data.tags["cnnlab.stage"] for r in queued) == ["ensemble", "evaluate", "report", "train"]
    for run in queued:  # artifacts next to the project's store, not in the temporary copy
        assert run.info.status == "FINISHED"
        assert run.info.artifact_uri.startswith((repo / "mlartifacts").as_uri())
    assert not list((repo / ".dvc" / "tmp" / "exps").rglob("mlflow.db"))
