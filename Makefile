# The README's two commands: `make train` and `make test`. Both create .venv once and reuse it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: setup train test test-fast ui lock clean params study

setup: $(INSTALLED)

# Reinstall only when the dependency files change. torch goes first and alone, pinned, so
# nothing later can pull a CUDA build in through a dependency's version range.
$(INSTALLED): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(INSTALLED)

train: setup
	$(PY) src/train.py $(ARGS)

# Two processes, each file in one of them (module fixtures run once), files handed out in collection order
# (slow files first: tests/conftest.py), not xdist's default of most tests first, which left the long
# one-test files for last and one process idle while the other ran them.
test: setup
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder $(ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(ARGS)

# This machine only: the UI has no login. `make ui UI_HOST=0.0.0.0` serves other machines too.
# Set with := so only the command line overrides it, not an environment variable (zsh exports HOST).
UI_HOST := 127.0.0.1
ui: setup
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host $(UI_HOST) --port 5000

# params.yaml from conf/pipeline.yaml, for `dvc repro` after an edit there (`dvc exp run` composes it itself).
params: setup
	$(PY) -m cnnlab.pipeline.params

# One study of the course notes' claims (pipelines/<NAME>/dvc.yaml; docs/studies.md): make study NAME=residual_vs_plain
STUDIES := $(notdir $(patsubst %/dvc.yaml,%,$(wildcard pipelines/*/dvc.yaml)))
study: setup
	@test -n "$(NAME)" -a -f pipelines/$(NAME)/dvc.yaml || { echo "make study NAME=<one of: $(STUDIES)>"; exit 2; }
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro pipelines/$(NAME)/dvc.yaml

# Rewrite constraints.txt from the working venv after a dependency change (then run `make test`).
lock: setup
	$(PY) -m pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' > constraints.txt

clean:
	rm -rf $(VENV) outputs data mlflow.db mlartifacts .pytest_cache
