"""flannel-repro: the Flannel 7 training-dynamics run as reproducible software.

    from flannel_repro import load_trajectory
    traj = load_trajectory("tensors/Flannel/1.20h_flannel_7.safetensors")
    w_250 = traj.step("W", 250)  # (vocab, hidden) bf16, read lazily from the mapped file
"""

from .trajectory import Trajectory, load_trajectory

__all__ = ["Trajectory", "load_trajectory"]
__version__ = "0.1.0"
