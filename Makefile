# Every target creates/refreshes the local virtualenv itself.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The torch that `make` installs: the CPU build the tests run on. Bring your own (a cluster's CUDA
# build) with `make TORCH_SPEC= ...` after installing it into .venv, or see README "Install".
TORCH_SPEC ?= torch==2.13.0
# glibc returns large MoE temporaries to the OS on every step unless told otherwise; page faults then
# cost more than the arithmetic (see docs). jemalloc/tcmalloc users can override these.
export MALLOC_MMAP_THRESHOLD_ ?= 1073741824
export MALLOC_TRIM_THRESHOLD_ ?= 4294967296
export MALLOC_TOP_PAD_ ?= 268435456
# This one backs malloc's heap with transparent huge pages (glibc >= 2.35; ignored elsewhere): far
# fewer faults while the heap grows (docs/performance.md).
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: venv test bench quickstart replicate replicate-isoflop clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(if $(TORCH_SPEC),$(PY) -m pip install -q "$(TORCH_SPEC)")
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -c "import finemoe, torch, scipy, tokenizers"
	test -x $(VENV)/bin/ruff
	touch $(STAMP)

LINTED := finemoe tests benchmarks experiments

test: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/finemoe bench moe-layer --breakdown
	$(PY) benchmarks/bench_fit.py
	$(PY) benchmarks/bench_train.py --cpu-matmul mkl onednn
	$(PY) benchmarks/bench_cpu_gemm.py
	$(PY) -m pytest -q -m slow tests -k bench || test $$? -eq 5

quickstart: $(STAMP)
	$(VENV)/bin/finemoe quickstart

# The mini-replication (experiments/mini/): about 2-3 hours on 2 CPU cores. Finished runs are read
# back from the committed CSV, so only missing runs train; the report is rebuilt from all of them.
REPLICATE_NOTE ?= make replicate on $(shell nproc) CPU cores
replicate: $(STAMP)
	$(VENV)/bin/finemoe data prepare
	$(VENV)/bin/finemoe sweep run experiments/mini/spec.yaml
	$(VENV)/bin/finemoe report experiments/mini/results.csv --out experiments/mini --name REPORT.md \
	  --title "Mini-replication on 2 CPU cores" --note "$(REPLICATE_NOTE)" \
	  --discussion experiments/mini/discussion.md

# Replication v2 (experiments/isoflop/): iso-FLOP curves per G from WSD cooldown branches, about 11
# worker-hours on 2 CPU cores (two 1-thread workers). Like `replicate`, it trains only what the
# committed CSVs lack, then rebuilds the report from all finished runs.
replicate-isoflop: $(STAMP)
	$(VENV)/bin/finemoe data prepare
	$(VENV)/bin/finemoe sweep run experiments/isoflop/wsd_check.yaml
	$(VENV)/bin/finemoe sweep run experiments/isoflop/lr_check.yaml
	for f in experiments/isoflop/lr_grid_*.yaml; do $(VENV)/bin/finemoe sweep run $$f || exit 1; done
	$(VENV)/bin/finemoe sweep run experiments/isoflop/spec.yaml
	$(VENV)/bin/finemoe sweep run experiments/isoflop/seed_check.yaml
	$(VENV)/bin/finemoe report experiments/isoflop/results.csv --out experiments/isoflop --name REPORT.md \
	  --loss val_loss --title "Iso-FLOP replication on 2 CPU cores" --note "make replicate-isoflop on $(shell nproc) CPU cores" \
	  $(if $(wildcard experiments/isoflop/discussion.md),--discussion experiments/isoflop/discussion.md)
	$(PY) experiments/isoflop/compare_wsd.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
