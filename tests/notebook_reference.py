"""The Flannel 7 notebook's own code, cells 5-12, run as a script on given files and constants.

Used by tests/test_fidelity.py (and bench/) as the reference flannel-repro must match bit for bit. The class and
training code below is the notebook's, unchanged except that the constants come from the command line, the
output goes where the caller says, and TrainingArguments gets use_cpu on a CPU-only machine (transformers 5 refuses
bf16 there without it).

    python tests/notebook_reference.py CONFIG.json
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

cfg = json.loads(Path(sys.argv[1]).read_text())
NUM_RUNS = 1
INIT_SEED = cfg["init_seed"]
BASE_TRAIN_SEED = cfg["train_seed"]
RECORD_CONFIG = {"W": True, "grads": True, "momentum": False, "variance": False, "logits": False, "losses": True}
VOCAB_SIZE = cfg["vocab_size"]
HIDDEN_DIM = cfg["hidden_dim"]
N_LAYER = cfg["n_layer"]
N_HEAD = cfg["n_head"]
MAX_SEQ_LEN = cfg["max_seq_len"]
BATCH_SIZE = cfg["batch_size"]
NUM_TRAIN_STEPS = cfg["steps"]
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.0
ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.999
ADAM_EPSILON = 1e-8
INIT_SCALE = 0.02
TOKENIZER_PATH = cfg["tokenizer"]
CORPUS_PATH = cfg["corpus"]
TOKEN_MASK_PATH = cfg["masks"]
OUTPUT_DIR = cfg["scratch_dir"]  # the notebook writes into its tensors folder; keep the Trainer's checkpoint out
OUTPUT_PATH = cfg["output"]
if cfg.get("num_threads"):
    torch.set_num_threads(cfg["num_threads"])

device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"

# Cell 5
tokenizer = Tokenizer.from_file(str(TOKENIZER_PATH))
with open(CORPUS_PATH, "r", encoding="utf-8") as f:
    corpus_text = f.read()
encoding = tokenizer.encode(corpus_text)
tokens = encoding.ids
corpus_tensor = torch.tensor(tokens, dtype=torch.long, device=device)
mask_data = load_file(TOKEN_MASK_PATH)
dead_indices = mask_data["dead_indices"]
n_dead = mask_data["dead_mask"].sum().item()
n_live = mask_data["live_mask"].sum().item()


# Cell 6
class TokenDataset(Dataset):
    def __init__(self, corpus_tensor, max_seq_len):
        self.corpus = corpus_tensor
        self.max_seq_len = max_seq_len

    def __len__(self):
        return max(0, len(self.corpus) - self.max_seq_len)

    def __getitem__(self, idx):
        chunk = self.corpus[idx : idx + self.max_seq_len + 1]
        return {"input_ids": chunk[:-1], "labels": chunk[1:]}


dataset = TokenDataset(corpus_tensor, MAX_SEQ_LEN)

# Cell 7
torch.manual_seed(INIT_SEED)
np.random.seed(INIT_SEED)
W_initial_f32 = torch.randn(VOCAB_SIZE, HIDDEN_DIM, dtype=torch.float32) * INIT_SCALE
W_initial = W_initial_f32.to(torch.bfloat16)

# Cell 8
tensors = {}
if RECORD_CONFIG["W"]:
    tensors["W"] = torch.zeros((NUM_RUNS, NUM_TRAIN_STEPS + 1, VOCAB_SIZE, HIDDEN_DIM), dtype=torch.bfloat16)
if RECORD_CONFIG["grads"]:
    tensors["grad_W"] = torch.zeros((NUM_RUNS, NUM_TRAIN_STEPS + 1, VOCAB_SIZE, HIDDEN_DIM), dtype=torch.bfloat16)
if RECORD_CONFIG["losses"]:
    tensors["losses"] = torch.full((NUM_RUNS, NUM_TRAIN_STEPS + 1), float("nan"), dtype=torch.bfloat16)


# Cell 9
class BatchRecorder:
    """Records data directly into pre-allocated tensors."""

    def __init__(self, tensors, record_config, run_idx):
        self.tensors = tensors
        self.config = record_config
        self.run_idx = run_idx
        self.current_step = 0
        self.recorded_initial = False
        self.loss_value = None

    def record_initial_state(self, model, optimizer):
        if not self.recorded_initial:
            t = 0
            if self.config["W"]:
                self.tensors["W"][self.run_idx, t] = model.transformer.wte.weight.data.clone().cpu().bfloat16()
            if self.config["grads"]:
                self.tensors["grad_W"][self.run_idx, t] = 0
            self.recorded_initial = True
            self.current_step = 1

    def record_before_step(self, model, loss, logits):
        if self.config["losses"]:
            self.loss_value = loss.item()
        if self.config["grads"]:
            t = self.current_step
            if t <= self.tensors["grad_W"].shape[1] - 1:
                if model.transformer.wte.weight.grad is not None:
                    self.tensors["grad_W"][self.run_idx, t] = model.transformer.wte.weight.grad.clone().cpu().bfloat16()

    def record_after_step(self, model, optimizer):
        t = self.current_step
        if t > self.tensors["W"].shape[1] - 1 if "W" in self.tensors else float("inf"):
            return
        if self.config["W"]:
            self.tensors["W"][self.run_idx, t] = model.transformer.wte.weight.data.clone().cpu().bfloat16()
        if self.config["losses"] and self.loss_value is not None:
            self.tensors["losses"][self.run_idx, t] = self.loss_value
            self.loss_value = None
        self.current_step += 1


# Cell 10
class InstrumentedTrainer(Trainer):
    def __init__(self, recorder, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorder = recorder
        self.last_logits = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs.loss
        self.last_logits = outputs.logits
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.recorder.record_before_step(model, loss, self.last_logits)
        return loss

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time=None, **kwargs):
        self.recorder.record_after_step(model, self.optimizer)
        super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time, **kwargs)


# Cell 11
run_idx = 0
train_seed = BASE_TRAIN_SEED
torch.manual_seed(train_seed)
np.random.seed(train_seed)
config = GPT2Config(
    vocab_size=VOCAB_SIZE,
    n_positions=MAX_SEQ_LEN,
    n_embd=HIDDEN_DIM,
    n_layer=N_LAYER,
    n_head=N_HEAD,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    tie_word_embeddings=True,
)
model = GPT2LMHeadModel(config).to(torch.bfloat16).to(device)
with torch.no_grad():
    model.transformer.wte.weight[:] = W_initial.to(device)
recorder = BatchRecorder(tensors, RECORD_CONFIG, run_idx)
training_args = TrainingArguments(
    output_dir=OUTPUT_DIR,
    max_steps=NUM_TRAIN_STEPS,
    per_device_train_batch_size=BATCH_SIZE,
    learning_rate=LEARNING_RATE,
    weight_decay=WEIGHT_DECAY,
    adam_beta1=ADAM_BETA1,
    adam_beta2=ADAM_BETA2,
    adam_epsilon=ADAM_EPSILON,
    optim="adamw_torch",
    logging_steps=1000,
    save_steps=NUM_TRAIN_STEPS + 1,
    save_total_limit=0,
    dataloader_num_workers=0,
    dataloader_pin_memory=False,
    bf16=True,
    seed=train_seed,
    report_to="none",
    disable_tqdm=True,
    # The one addition: transformers 5 refuses bf16=True on a machine without a GPU unless use_cpu is set
    # ("Your setup doesn't support bf16/gpu"); on the notebook's MPS machine this was False anyway.
    use_cpu=device == "cpu",
)
trainer = InstrumentedTrainer(recorder=recorder, model=model, args=training_args, train_dataset=dataset)
recorder.record_initial_state(model, trainer.optimizer)
run_start = time.time()
trainer.train()
run_elapsed = time.time() - run_start

# Cell 12
save_dict = {
    "n_runs": torch.tensor(NUM_RUNS, dtype=torch.long),
    "init_seed": torch.tensor(INIT_SEED, dtype=torch.long),
    "train_seed": torch.tensor(BASE_TRAIN_SEED, dtype=torch.long),
    "n_steps": torch.tensor(NUM_TRAIN_STEPS, dtype=torch.long),
    "n_live": torch.tensor(n_live, dtype=torch.long),
    "n_dead": torch.tensor(n_dead, dtype=torch.long),
    "vocab_size": torch.tensor(VOCAB_SIZE, dtype=torch.long),
    "hidden_dim": torch.tensor(HIDDEN_DIM, dtype=torch.long),
    "init_scale": torch.tensor(INIT_SCALE, dtype=torch.float32),
    "learning_rate": torch.tensor(LEARNING_RATE, dtype=torch.float32),
    "weight_decay": torch.tensor(WEIGHT_DECAY, dtype=torch.float32),
    "adam_beta1": torch.tensor(ADAM_BETA1, dtype=torch.float32),
    "adam_beta2": torch.tensor(ADAM_BETA2, dtype=torch.float32),
    "W_initial": W_initial,
    "recorded_W": torch.tensor(RECORD_CONFIG["W"], dtype=torch.bool),
    "recorded_grads": torch.tensor(RECORD_CONFIG["grads"], dtype=torch.bool),
    "recorded_losses": torch.tensor(RECORD_CONFIG["losses"], dtype=torch.bool),
}
for name, tensor in tensors.items():
    save_dict[name] = tensor
Path(OUTPUT_PATH).parent.mkdir(parents=True, exist_ok=True)
save_file(save_dict, str(OUTPUT_PATH))
print(json.dumps({"train_s": run_elapsed}))
