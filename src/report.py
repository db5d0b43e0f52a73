"""Summarise the main pipeline's results (dvc.yaml's report stage): ``python src/report.py``
writes report.md and report.html with the tables and pictures, and logs them to MLflow."""

import hydra

from cnnlab.errors import one_line_errors
from cnnlab.pipeline.report import report


@hydra.main(version_base="1.3", config_path="../conf", config_name="report")
@one_line_errors
def main(cfg) -> None:
    report(cfg)


if __name__ == "__main__":
    main()
