# unifex: `make demo` (main job) and `make test`.  Everything installs into .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PM     := $(VENV)/bin/papermill --cwd . --kernel python3 --progress-bar
DEMO   := outputs/demo
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install install-dev demo test test-all bench lab clean-demo

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed

## demo: generate the demo data and run the five notebooks in order into outputs/demo/
DEMO_BACKBONE := {backbone_type: timm, backbone: resnet18, pretrained: false, neck: pooling}
demo: $(VENV)/.installed
	mkdir -p $(DEMO)/notebooks
	$(PM) notebooks/curate.ipynb $(DEMO)/notebooks/curate.ipynb -p params_file params/demo.yaml -p run_name demo/curate
	$(PM) notebooks/zero_shot.ipynb $(DEMO)/notebooks/zero_shot.ipynb -p params_file params/demo.yaml \
		-p run_name demo/zero_shot -p cache_dir "" -y "backbones: [$(DEMO_BACKBONE)]"
	$(PM) notebooks/train.ipynb $(DEMO)/notebooks/train.ipynb -p params_file params/demo.yaml -p run_name demo
	$(PM) notebooks/evaluate_uned.ipynb $(DEMO)/notebooks/evaluate_uned.ipynb -p params_file params/demo.yaml -p run_name demo
	$(PM) notebooks/kaggle_submission.ipynb $(DEMO)/notebooks/kaggle_submission.ipynb -p params_file params/demo.yaml -p run_name demo
	$(PY) -m unifex_lib.report $(DEMO)

## test: the test suite (slow-marked tests excluded; `make test-all` runs them too)
test: $(VENV)/.installed
	$(VENV)/bin/pytest -q

test-all: $(VENV)/.installed
	$(VENV)/bin/pytest -q -m ""

bench: $(VENV)/.installed
	$(PY) benchmarks/feature_cache.py
	$(PY) benchmarks/knn_search.py
	$(PY) benchmarks/kmeans.py

lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab notebooks/

clean-demo:
	rm -rf $(DEMO)
