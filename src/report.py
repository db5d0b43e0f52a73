"""Summarise the main pipeline's results (dvc.yaml's report stage): ``python src/report.py``
writes report.md and report.html with the tables and pictures, and logs them to MLflow."""

import hydra

from cnnlab import schema
from cnnlab.cli import resolve_printed_config
from cnnlab.errors import one_line_errors


@hydra.main(version_base="1.3", config_path="../conf", config_name="report")
@one_line_errors
def main(cfg) -> None:
    schema.validate(cfg, schema.Report)
    # imported once the values passed: a refused one is told in a second, not after torch loads
    from cnnlab.pipeline.report import report
    report(cfg)


if __name__ == "__main__":
    resolve_printed_config()
    main()
