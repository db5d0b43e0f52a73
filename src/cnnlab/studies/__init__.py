"""The studies: each claim of the course notes as an experiment (pipelines/<study>/dvc.yaml).

A study's trials are ordinary runs of the main scripts (train.py, evaluate.py, ...); its last stage,
``src/study.py study=<name>``, reads what they wrote and summarises them (``cnnlab.studies.summary``).
"""
