# Two commands for a fresh machine: `make demo` and `make test`.
# Both create .venv if it is missing and install what they need.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-adapters test bench bench-train replicate clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: the dev/CI machines hold a CPU wheel of 2.13.0 locally.
	# Installing the package with only its torch range and no torch present would
	# resolve to the newest CUDA build (several GB). With 2.13.0 already installed
	# the range is satisfied and nothing more is fetched.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

# The user path on a tiny Llama on CPU: HF folder -> convert (TP=2) -> torchrun train MiLoRA
# -> merged HF + PEFT adapter -> transformers generate. Everything lands in runs/demo.
demo: $(STAMP)
	$(PY) launch/demo_pipeline.py --method milora

# Foundation demo: the adapters alone on a tiny megatron model, TP=2 over gloo.
demo-adapters: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node 2 launch/demo_adapters.py --method milora

bench: $(STAMP)
	$(PY) benchmarks/bench_subspace_init.py

# Training throughput through the real trainer; --small fits a CPU. On a GPU:
#   .venv/bin/python benchmarks/bench_train_throughput.py   (Llama-3-8B shape, seq 2048)
bench-train: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) benchmarks/bench_train_throughput.py --small

# The CPU replication of the paper's claims (replication/replicate.py; ~45 min on 2 cores).
# Writes replication/results/ (RESULTS.md, replication.png, runs.json); reruns reuse runs/replication.
replicate: $(STAMP)
	$(PY) replication/replicate.py

clean:
	rm -rf $(VENV) build *.egg-info
