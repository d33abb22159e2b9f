"""The notebook's model, data windows and device, built exactly as the notebook builds them.

`TokenDataset` gives the notebook's windows over the token stream; `initial_embedding` draws W_initial;
`build_model` makes the GPT-2 with tied embeddings, dropouts 0 and bfloat16 weights; `set_determinism` and
`pick_device` fix what "the same device" means for bit-for-bit replay. `loop.py` puts them together.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from flannel_repro.core.config import ModelConfig, TrainConfig
from flannel_repro.core.errors import FlannelError

# Set before CUDA starts: cuBLAS needs a fixed workspace for deterministic matmuls.
CUBLAS_WORKSPACE = ":4096:8"


class TokenDataset(Dataset):
    """The notebook's windows over the token stream, plus each window's index (so batches can be rebuilt).

    label_mode "notebook" keeps the notebook's labels, already shifted by one (GPT2LMHeadModel shifts again, so
    position i learns token i+2); "next_token" passes the window itself as labels, for true next-token training.
    """

    def __init__(self, tokens: torch.Tensor, max_seq_len: int, label_mode: str = "notebook") -> None:
        self.corpus = tokens
        self.max_seq_len = max_seq_len
        self.label_mode = label_mode

    def __len__(self) -> int:
        return max(0, len(self.corpus) - self.max_seq_len)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        chunk = self.corpus[idx : idx + self.max_seq_len + 1]
        labels = chunk[1:] if self.label_mode == "notebook" else chunk[:-1]
        return {"input_ids": chunk[:-1], "labels": labels, "sample_index": idx}


def device_available(device_type: str) -> bool:
    """Whether this machine has a `device_type` ("cpu", "cuda" or "mps") device."""
    return {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}[device_type]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device(next(t for t in ("cuda", "mps", "cpu") if device_available(t)))
    if not device_available(name):
        raise FlannelError(f"params: train.device = {name!r} is not available on this machine; use auto or cpu")
    return torch.device(name)


def check_single_device(device: torch.device) -> None:
    """With several visible GPUs the Trainer would wrap the model in DataParallel and multiply the batch size."""
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        raise FlannelError(
            f"{torch.cuda.device_count()} GPUs are visible, but a trajectory is recorded on one device; run with "
            "CUDA_VISIBLE_DEVICES=0 (or another single index)"
        )


def set_determinism(cfg: TrainConfig) -> None:
    """The switches bit-for-bit replay needs. The CPU thread count changes the numbers, so params can pin it."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    torch.use_deterministic_algorithms(True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def initial_embedding(model: ModelConfig, cfg: TrainConfig) -> torch.Tensor:
    """W_initial, (V, H) bf16: drawn in float32 from init_seed, then cast, as the notebook does."""
    torch.manual_seed(cfg.init_seed)
    np.random.seed(cfg.init_seed)
    w = torch.randn(model.vocab_size, model.hidden_dim, dtype=torch.float32) * cfg.init_scale
    return w.to(torch.bfloat16)


def build_model(model_cfg: ModelConfig, w_initial: torch.Tensor, device: torch.device):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=model_cfg.vocab_size,
        n_positions=model_cfg.max_seq_len,
        n_embd=model_cfg.hidden_dim,
        n_layer=model_cfg.n_layer,
        n_head=model_cfg.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config).to(torch.bfloat16).to(device)
    with torch.no_grad():
        model.transformer.wte.weight[:] = w_initial.to(device)
    return model
