"""The HF Trainer as the notebook configures it, without the per-step bookkeeping that computes no number.

`training_arguments` are the notebook's TrainingArguments; `make_trainer` builds the Trainer whose overrides each
return exactly what the stock method returns (the loss without Accelerate's float32 copy of the logits, the
pre-clip gradient norm handed to the recorder, the FLOP count made once).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset

from flannel_repro.core.config import TrainConfig
from flannel_repro.recording.records import StepObserver


def training_arguments(cfg: TrainConfig, device: torch.device, seed: int, output_dir: str, checkpoint_every: int = 0):
    """The notebook's TrainingArguments, with the Trainer's own resumable checkpoints every `checkpoint_every` steps
    when asked, and without its per-step log: the recorder takes the gradient norm and the learning rate where the
    Trainer computes them (`make_trainer`, `recorder.TrajectoryCallback`). Neither changes a number."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_epsilon=cfg.adam_epsilon,
        max_grad_norm=cfg.max_grad_norm,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        logging_strategy="no",  # no log entry, .item() or on_log round per step
        logging_nan_inf_filter=False,  # filters only the logged loss: two tensor checks and a device sync per step
        remove_unused_columns=False,  # keep sample_index for the recorder; the notebook's columns are all used
        save_strategy="steps" if checkpoint_every else "no",
        save_steps=checkpoint_every or 500,
        save_only_model=False,  # optimizer, scheduler and RNG states too
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        bf16=True,
        seed=seed,
        report_to="none",
        disable_tqdm=True,
        use_cpu=device.type == "cpu",
    )


def make_trainer(model, args, dataset: Dataset, observer: StepObserver, callbacks: list):
    from transformers import PrinterCallback, ProgressCallback, Trainer

    class FlannelTrainer(Trainer):
        """The notebook's Trainer (its loss is the model's mean loss over the batch, as the notebook's compute_loss
        returns) without the per-step work that computes no number of the run. Each override returns exactly what
        the Trainer's own method returns."""

        _plain: tuple[Any, Any] | None = None  # (model, the same without Accelerate's output conversion)
        _flops_per_token: int | None = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            indices = inputs.pop("sample_index")
            # With bf16, Accelerate wraps forward in autocast AND converts every output to float32 afterwards:
            # for the (batch, seq, vocab) logits that is 164 MB and ~8% of a step, and nothing reads them. Run the
            # plain forward inside the very same autocast context instead; the loss is bit-identical.
            if self._plain is None or self._plain[0] is not model:
                self._plain = (model, self.accelerator.unwrap_model(model, keep_fp32_wrapper=False))
            with self.accelerator.autocast():
                outputs = self._plain[1](**inputs)
            observer.observe(outputs.loss, indices)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

        def _get_grad_norm(self, model, grad_norm=None):
            # A private method, as no public callback is given the pre-clip norm except through the per-step log;
            # test_train.py checks the recorded norm against that log, so a renamed method cannot go unnoticed.
            grad_norm = super()._get_grad_norm(model, grad_norm)  # before clipping
            observer.grad_norm = grad_norm
            return grad_norm

        def floating_point_ops(self, inputs):
            # The Trainer's count (6 x tokens x parameters), without walking every parameter at every step.
            if self._flops_per_token is None:
                self._flops_per_token = 6 * self.model.num_parameters(exclude_embeddings=True)
            return inputs["input_ids"].numel() * self._flops_per_token

    trainer = FlannelTrainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


@contextlib.contextmanager
def scratch_dir() -> Iterator[str]:
    """The Trainer's output_dir, kept out of every versioned folder."""
    path = tempfile.mkdtemp(prefix="flannel-trainer-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
