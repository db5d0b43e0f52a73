"""A study run end to end with real `dvc repro` in a new git repository, and the checks every study passes."""

from __future__ import annotations

import functools
import itertools
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from cnnlab.studies.summary import VERDICTS, claims_table
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


@functools.cache
def empty_store(folder: Path) -> Path:
    """An MLflow SQLite store in ``folder`` with its tables made and nothing in it (made once per folder).

    The first stage of a study opening a store that does not exist yet runs all of MLflow's migrations:
    1 s of CPU, and up to 5 s in all on a busy machine (the disk), in every study's test. A copy of this
    one is where the stages look for the store (paths.mlflow_db: mlflow.db at DVC_ROOT), and they open it
    as any existing store; the project making a missing store is tested where it makes it (tracking.prepare_store)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db = folder / "empty-mlflow-store" / "mlflow.db"
    db.parent.mkdir(parents=True)
    SqlAlchemyStore(f"sqlite:///{db}", (db.parent / "mlartifacts").as_uri()).engine.dispose()
    return db


def run_study(root: Path, name: str, tiny: dict) -> StudyRun:
    """The project's code with the study's params.yaml changed by ``tiny`` (top-level keys replaced whole),
    reproduced twice."""
    copy_project(root, studies=(name,))
    params_file = root / "pipelines" / name / "params.yaml"
    params = {**yaml.safe_load(params_file.read_text()), **tiny}
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    commit_all(root, f"tiny {name}")
    shutil.copyfile(empty_store(root.parent), root / "mlflow.db")  # git ignores it, as it does the project's
    first = dvc(root, "repro", f"pipelines/{name}/dvc.yaml")
    return StudyRun(name, root, params, first, dvc(root, "repro", f"pipelines/{name}/dvc.yaml"))


CLAIMS_HEADER = claims_table([]).splitlines()          # "| claim of the notes | measured | verdict |", "|---|..."
CLAIM_ROW = re.compile(r"\| (.+?) \| (.+?) \| \*\*(.+?)\*\* \|")


def claims(summary: str) -> list[tuple[str, str, str]]:
    """The rows of the claims table summary.md opens with (its first table; the trials' tables that
    follow may end in a bold cell too): (claim, measured, verdict)."""
    lines = summary.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), len(lines))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    assert table[:2] == CLAIMS_HEADER, f"summary.md's first table is not its claims table:\n{summary}"
    rows = [CLAIM_ROW.fullmatch(line) for line in table[2:]]
    assert all(rows), f"a claims row that is not | claim | measured | **verdict** |:\n{summary}"
    return [row.groups() for row in rows]


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
