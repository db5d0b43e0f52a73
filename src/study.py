"""Summarise a study (the last stage of pipelines/<study>/dvc.yaml): ``python src/study.py study=<name>``
reads its trials' results and writes summary.md, summary.png and summary.json (see docs/studies.md)."""

import hydra

from cnnlab import schema
from cnnlab.cli import resolve_printed_config
from cnnlab.errors import one_line_errors


@hydra.main(version_base="1.3", config_path="../conf", config_name="study")
@one_line_errors
def main(cfg) -> None:
    schema.validate(cfg, schema.Study)
    # imported once the values passed: a refused one is told in a second, not after torch loads
    from hydra.utils import instantiate
    from cnnlab.studies.summary import summarise
    summarise(cfg, instantiate(cfg.study.measure))


if __name__ == "__main__":
    resolve_printed_config()
    main()
