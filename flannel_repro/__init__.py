"""flannel-repro: the Flannel 7 training-dynamics run as reproducible software.

    from flannel_repro import load_trajectory
    traj = load_trajectory("tensors/Flannel/1.20h_flannel_7.safetensors")
    w_250 = traj.step("W", 250)  # (vocab, hidden) bf16, read lazily from the mapped file

The package is in folders by concern (README.md, "Where the code is"; tests/test_layout.py holds which folder may
import which): core/, data/ (the data stages), trajectory/ (the file), recording/, training/, tracking/ (MLflow),
audit/ (verify, check, diff). cli.py's table of commands names each command's module. This file imports nothing
until `load_trajectory` is used, so a data stage loads no torch.
"""

__all__ = ["Trajectory", "load_trajectory"]
__version__ = "0.2.0"


def __getattr__(name: str):
    # Imported on first use, so a data stage does not load the trajectory code (nor depend on it in dvc.yaml).
    if name in __all__:
        from flannel_repro.trajectory import file as trajectory

        return getattr(trajectory, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
