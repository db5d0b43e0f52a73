"""What every study under pipelines/ shares, without running one: its files, its params, its docs."""

import re

import pytest
import yaml

from cnnlab.studies.summary import points, significant
from conftest import ROOT
from dvc_repo import stage_keys
from study_runs import claims

STUDIES = sorted(path.parent.name for path in (ROOT / "pipelines").glob("*/dvc.yaml"))
DOCS = (ROOT / "docs" / "studies.md").read_text() if (ROOT / "docs" / "studies.md").is_file() else ""


def stages(study: str) -> dict:
    return yaml.safe_load((ROOT / "pipelines" / study / "dvc.yaml").read_text())["stages"]


def test_there_are_the_seven_studies_of_issue_13():
    assert STUDIES == sorted(["residual_vs_plain", "separable_cost", "inception_bottleneck", "compound_scaling",
                              "freeze_vs_data", "augmentation", "ensemble_multicrop"])


@pytest.mark.parametrize("study", STUDIES)
def test_a_study_has_a_section_and_its_default_results_are_committed(study):
    assert f"\n## {study}\n" in DOCS
    assert (ROOT / "pipelines" / study / "dvc.lock").is_file()
    assert (ROOT / "pipelines" / study / "results/summary/summary.md").is_file()


@pytest.mark.parametrize("study", STUDIES)
def test_a_study_has_params_a_summary_config_and_a_summary_stage(study):
    params = yaml.safe_load((ROOT / "pipelines" / study / "params.yaml").read_text())
    assert params["study"] == study
    config = yaml.safe_load((ROOT / "conf" / "study" / f"{study}.yaml").read_text())
    assert config["name"] == study and config["measure"]["_target_"] == f"cnnlab.studies.{study}.measure"
    summary = stages(study)["summary"]
    assert "../../src/study.py study=${study}" in summary["cmd"]


@pytest.mark.parametrize("study", STUDIES)
def test_each_stage_lists_exactly_the_params_its_command_uses(study):
    for name, stage in stages(study).items():
        used, listed = stage_keys(name, stage)
        covered = {key for key in used if any(key == p or key.startswith(p + ".") for p in listed)}
        assert covered == used, f"{study}:{name}: its command uses {sorted(used - covered)}, not in its params:"
        if name != "summary":  # the summary reads the study's params.yaml itself
            unused = {p for p in listed if not any(key == p or key.startswith(p + ".") for key in used)}
            assert not unused, f"{study}:{name}: params: lists {sorted(unused)}, which its command does not use"


@pytest.mark.parametrize("study", STUDIES)
def test_only_the_summary_depends_on_the_study_modules(study):
    # editing how a study is measured must re-run its summary alone, never its trainings
    for name, stage in stages(study).items():
        if name != "summary":
            stage = stage.get("do", stage)
            assert not [d for d in stage.get("deps", []) if "cnnlab/studies" in d], name
            assert "cnnlab.studies" not in stage["cmd"], name


@pytest.mark.parametrize("study", STUDIES)
def test_each_stage_logs_into_the_studys_experiment_in_the_projects_store(study):
    for name, stage in stages(study).items():
        cmd = stage.get("do", stage)["cmd"]
        assert r"'paths.root_dir=\${oc.env:DVC_ROOT,.}'" in cmd, name
        if name != "summary":  # the summary's experiment is study-<name> by its config
            assert "experiment=study-${study}" in cmd and ("+tags.cnnlab.study=${study}" in cmd
                                                           or "prepare.py" in cmd), name


@pytest.mark.parametrize("study", [s for s in STUDIES if (ROOT / "pipelines" / s / "results/summary/summary.md").is_file()])
def test_docs_open_with_every_studys_measured_claims(study):
    summary = (ROOT / "pipelines" / study / "results/summary/summary.md").read_text()
    for claim, measured, verdict in claims(summary):
        row = re.escape(f"| {claim} | {measured} | **{verdict}** |")
        assert re.search(rf"^\| \[{study}\]\(#{study}\) {row}$", DOCS, re.MULTILINE), \
            f"docs/studies.md lacks {study}'s row for: {claim} (copy it from {study}'s summary.md)"
    assert f"../pipelines/{study}/results/summary/summary.png" in DOCS


def test_points_sign_a_gain_or_a_loss_and_not_a_size():
    assert points(0.032) == "3.2 points" and points(0.032, signed=True) == "+3.2 points"
    assert points(-0.0049, signed=True) == "-0.5 points" and points(0, signed=True) == "+0.0 points"


def test_significant_figures_are_never_written_in_powers_of_ten():
    assert [significant(v, 2) for v in (129.08, 6.14, 0.00981, 1234.5)] == ["130", "6.1", "0.0098", "1200"]
    assert significant(57.64, 3) == "57.6" and significant(1234.5, 3) == "1230"
