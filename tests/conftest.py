import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "support"))  # test helpers
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

# The suite is the CPU/gloo suite: GPUs are hidden from it and every process it starts
# (spawned ranks, torchrun, Slurm jobs), so on a GPU host it runs exactly as on CI. The GPU
# path is checked by tools/gpu_check.py (make gpu-check), which runs here at tiny size too.
os.environ["CUDA_VISIBLE_DEVICES"] = ""


# Slurm's test clusters (one node, two nodes) run after the rest, one test at a time: a job's
# torchrun rendezvous on a CPU saturated by the other worker's tests has failed its c10d store
SERIAL_FILES = ("test_slurm.py", "test_slurm_two_nodes.py")


def pytest_collection_modifyitems(items):
    """Under pytest-xdist (make test: -n 2 --dist loadgroup) a file's tests run on one worker,
    so its module fixtures (a converted model, a training run) are built once; the Slurm
    files are marked ``serial`` (make test runs them on their own afterwards)."""
    import pytest

    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group(name))
        if name in SERIAL_FILES:
            item.add_marker(pytest.mark.serial)
