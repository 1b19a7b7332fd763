# Two commands for a fresh machine: `make demo` and `make test`.
# Both create .venv if it is missing and install what they need.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-adapters test bench clean

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

clean:
	rm -rf $(VENV) build *.egg-info
