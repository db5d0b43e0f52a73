"""A study run end to end with real `dvc repro` in a new git repository, and the checks every study passes."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from cnnlab.studies.summary import VERDICTS
from dvc_repo import commit_all, copy_project, dvc, stages_run


@dataclass
class StudyRun:
    name: str
    repo: Path
    params: dict
    first: object    # the first `dvc repro`
    again: object    # the second

    @property
    def folder(self) -> Path:
        return self.repo / "pipelines" / self.name

    @property
    def summary(self) -> str:
        return (self.folder / "results/summary/summary.md").read_text()

    @property
    def metrics(self) -> dict:
        return json.loads((self.folder / "results/summary/summary.json").read_text())

    def runs(self):
        client = MlflowClient(f"sqlite:///{self.repo}/mlflow.db")
        experiment = client.get_experiment_by_name(f"study-{self.name}")
        return client, client.search_runs([experiment.experiment_id], "", order_by=["attributes.start_time ASC"])


def run_study(root: Path, name: str, tiny: dict) -> StudyRun:
    """The project's code with the study's params.yaml changed by ``tiny`` (top-level keys replaced whole),
    reproduced twice."""
    copy_project(root, studies=(name,))
    params_file = root / "pipelines" / name / "params.yaml"
    params = {**yaml.safe_load(params_file.read_text()), **tiny}
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    commit_all(root, f"tiny {name}")
    first = dvc(root, "repro", f"pipelines/{name}/dvc.yaml")
    return StudyRun(name, root, params, first, dvc(root, "repro", f"pipelines/{name}/dvc.yaml"))


def claims(summary: str) -> list[tuple[str, str, str]]:
    """The rows of the claims table summary.md opens with: (claim, measured, verdict)."""
    return [(claim, measured, verdict) for claim, measured, verdict
            in re.findall(r"^\| (.+?) \| (.+?) \| \*\*(.+?)\*\* \|$", summary, re.MULTILINE)]


def check_study(run: StudyRun, expected_claims: int) -> None:
    """What every study promises: its stages, its files, a no-op second repro, its runs nested in MLflow."""
    stages = stages_run(run.first)
    prefix = f"pipelines/{run.name}/dvc.yaml:"
    assert f"{prefix}summary" in stages
    assert {f"{prefix}train@{key}" for key in run.params.get("trials", {})} <= stages
    assert stages_run(run.again) == set(), run.again.stdout

    found = claims(run.summary)
    assert len(found) == expected_claims, run.summary
    assert all(verdict in VERDICTS for _, _, verdict in found), found
    assert (run.folder / "results/summary/summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run.metrics and all(math.isfinite(v) for v in run.metrics.values()), run.metrics

    client, runs = run.runs()
    parents = [r for r in runs if r.data.tags.get("cnnlab.stage") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"summary.md", "summary.png", "summary.json"}
    trials = [r for r in runs if "cnnlab.trial" in r.data.tags]
    assert sorted(r.data.tags["cnnlab.trial"] for r in trials) == sorted(run.params.get("trials", {}))
    stages = [r for r in runs if r is not parent]
    assert {r.data.tags["cnnlab.dvc.stage"] for r in stages} <= stages_run(run.first)
    for stage in stages:  # every other stage's run nested under the study's
        assert stage.info.status == "FINISHED"
        assert stage.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert all(trial.data.tags["cnnlab.study"] == run.name for trial in trials)
