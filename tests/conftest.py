import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "support"))  # test helpers
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

# The suite is the CPU/gloo suite: GPUs are hidden from it and every process it starts
# (spawned ranks, torchrun, Slurm jobs), so on a GPU host it runs exactly as on CI. The GPU
# path is checked by tools/gpu_check.py (make gpu-check), which runs here at tiny size too.
os.environ["CUDA_VISIBLE_DEVICES"] = ""


# Slurm's test clusters (one node, two nodes) run one at a time: they share the host's daemons' names
SERIAL_GROUPS = {"test_slurm.py": "slurm", "test_slurm_two_nodes.py": "slurm"}


def pytest_collection_modifyitems(items):
    """Under pytest-xdist (make test: -n 2 --dist loadgroup) a file's tests run on one worker,
    so its module fixtures (a converted model, a training run) are built once."""
    import pytest

    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group(SERIAL_GROUPS.get(name, name)))
