# tokenmix — every target works on a fresh clone. `make run` and `make test` set up what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
STUDY ?= configs/fmnist_cpu.yaml
STUDY_RUNS ?= results/fmnist_cpu
REGIME_RUNS ?= results/fmnist_regime
ABLATION_RUNS ?= results/fmnist_ablation
JOBS ?= 2
START := $(shell date +%s)
REPORT = $(BIN)/python -m tokenmix report --runs $(STUDY_RUNS) --regime $(REGIME_RUNS) --figures figures --readme README.md
# the ablation grid's report (figures/ablation/), when its records exist
ABLATION_REPORT = if [ -d $(ABLATION_RUNS) ]; then $(BIN)/python -m tokenmix report --runs $(ABLATION_RUNS) \
	--figures figures/ablation; fi
export HF_HUB_OFFLINE := 1
export PYTHONDONTWRITEBYTECODE := 1
export MPLBACKEND := Agg

.PHONY: setup data teacher run study-full regime ablation test figures bench clean

setup: $(STAMP) data

# The venv is rebuilt only when pyproject.toml or constraints.txt change.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

# Fashion-MNIST: the Debian package when possible (root + apt), else torchvision's download.
data: $(STAMP)
	@if [ -f $(FMNIST) ]; then echo "Fashion-MNIST: $(dir $(FMNIST))"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "Fashion-MNIST: installing the Debian package dataset-fashion-mnist"; \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist)); \
	else echo "Fashion-MNIST: downloading with torchvision into data/"; \
	  $(BIN)/python -c "from tokenmix.data import load_fashion_mnist as f; f('data', True, True); f('data', False, True)"; fi

# TokenMix's teacher-map cache for Fashion-MNIST (a small CNN trained 2 epochs, ~2-3 min on CPU).
# Reused when present and valid; rebuilt when missing or stale.
teacher: setup
	$(BIN)/python -m tokenmix teacher --dataset fashion_mnist --img_size 28

# The main job: the CPU study's core (configs/fmnist_cpu.yaml without its `extended` entries: 7
# method configurations x 3 seeds, papermill runs of notebooks/10_train.ipynb, $(JOBS) at a time,
# into results/fmnist_cpu/), then the report (tables, figures, README) and the wall time.
# Finished runs are skipped and interrupted ones resumed, so a second `make run` only re-reports.
run: setup teacher
	$(BIN)/python -m tokenmix sweep $(STUDY) --core --jobs $(JOBS); rc=$$?; \
	$(REPORT) && echo "make run: $$(( $$(date +%s) - $(START) )) s wall time" && exit $$rc

# The whole study: the core and the `extended` entries (12 more runs, ~25 min more).
study-full: setup teacher
	$(BIN)/python -m tokenmix sweep $(STUDY) --jobs $(JOBS); rc=$$?; $(REPORT) && exit $$rc

# The pilot that chose the study's regime (24 runs, ~1 h; its records are published).
regime: setup
	$(BIN)/python -m tokenmix sweep configs/fmnist_regime.yaml --jobs $(JOBS); rc=$$?; $(REPORT) && exit $$rc

# The papers' ablations: masks x label rules (configs/fmnist_ablation.yaml, 33 runs, ~75 min),
# reported into figures/ablation/ (results, paired differences to each mask's area label).
ablation: setup teacher
	$(BIN)/python -m tokenmix sweep configs/fmnist_ablation.yaml --jobs $(JOBS); rc=$$?; \
	$(ABLATION_REPORT) && exit $$rc

test: setup
	$(BIN)/python -m pytest

# Every table and figure from the published records (no training; checkpoint measurements are read
# from results/*/analysis/ when the checkpoints are absent).
figures: setup
	$(REPORT) && $(ABLATION_REPORT)

# The overhead benchmark (every method vs CutMix, CPU preset + DeiT-S at 32 px, ~4 min here):
# writes figures/bench.{csv,md}; `make figures` pastes bench.md into the README.
bench: teacher
	$(BIN)/python -m tokenmix bench --out figures
	$(REPORT)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info tokenmix.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
