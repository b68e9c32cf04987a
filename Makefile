# Every target creates/refreshes the local virtualenv itself.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# glibc returns large MoE temporaries to the OS on every step unless told otherwise; page faults then
# cost more than the arithmetic (see docs). jemalloc/tcmalloc users can override these.
export MALLOC_MMAP_THRESHOLD_ ?= 1073741824
export MALLOC_TRIM_THRESHOLD_ ?= 4294967296
export MALLOC_TOP_PAD_ ?= 268435456
# This one backs malloc's heap with transparent huge pages (glibc >= 2.35; ignored elsewhere): ~40x
# fewer faults while the heap grows; MoE/dense training tokens/s 0.91 against 0.82 (medians, bench_train.py).
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: venv test bench quickstart replicate clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -c "import finemoe, torch, scipy, tokenizers"
	touch $(STAMP)

test: $(STAMP)
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

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
