import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "support"))  # test helpers
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

# The suite is the CPU/gloo suite: GPUs are hidden from it and every process it starts
# (spawned ranks, torchrun, Slurm jobs), so on a GPU host it runs exactly as on CI. The GPU
# path is checked by tools/gpu_check.py (make gpu-check), which runs here at tiny size too.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
