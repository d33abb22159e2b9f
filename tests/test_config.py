"""params.yaml -> frozen dataclasses: defaults are the notebook's constants, and every bad value fails early,
naming the key."""

import dataclasses

import pytest

from flannel_repro.core.config import Params, apply_overrides, load_params, params_from_dict
from flannel_repro.core.errors import ConfigError
from tests.conftest import REPO


def test_repository_params_are_the_notebook_constants():
    p = load_params(REPO / "params.yaml")
    assert p == Params()  # params.yaml and the dataclass defaults agree
    m, t, r = p.model, p.train, p.record
    assert (m.vocab_size, m.hidden_dim, m.n_layer, m.n_head, m.max_seq_len) == (10000, 64, 2, 2, 128)
    assert (t.batch_size, t.steps, t.learning_rate, t.weight_decay) == (32, 500, 1e-3, 0.0)
    assert (t.adam_beta1, t.adam_beta2, t.adam_epsilon, t.init_scale) == (0.9, 0.999, 1e-8, 0.02)
    assert (t.init_seed, t.train_seed, t.num_runs) == (42, 42, 1)
    assert (r.W, r.grads, r.momentum, r.variance, r.logits, r.losses) == (True, True, False, False, False, True)
    assert p.paths.tokenizer == "data/flannel_tokenizer_chars.json"
    assert p.paths.corpus == "data/flannel_model_corpus.txt"
    assert p.paths.tokenizer_corpus == "data/flannel_tokenizer_corpus.txt"
    assert p.tokenizer_corpus.seed != p.corpus.seed  # the tokenizer learns other words than the model corpus uses
    assert p.paths.masks == "tensors/Flannel/live_dead_tokens.safetensors"
    assert p.paths.trajectory == "tensors/Flannel/1.20h_flannel_7.safetensors"


def test_configs_are_frozen():
    p = Params()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.train.steps = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "doc, needle",
    [
        ({"train": {"steps": 0}}, "train.steps = 0 must be at least 1"),
        ({"train": {"batch_size": -1}}, "train.batch_size = -1 must be at least 1"),
        ({"train": {"batch_size": 0}}, "train.batch_size = 0"),
        ({"train": {"learning_rate": -0.1}}, "train.learning_rate = -0.1 must be positive"),
        ({"train": {"adam_beta1": 1.0}}, "train.adam_beta1 = 1.0 must be in [0, 1)"),
        ({"train": {"steps": "ten"}}, "train.steps must be int"),
        ({"train": {"steps": 2.5}}, "train.steps must be int"),
        ({"train": {"steps": True}}, "train.steps must be int"),
        ({"train": {"label_mode": "shifted"}}, "train.label_mode = 'shifted' is not one of notebook, next_token"),
        ({"train": {"device": "tpu"}}, "train.device = 'tpu'"),
        ({"train": {"num_threads": 0}}, "train.num_threads = 0"),
        ({"model": {"n_head": 3}}, "model.n_head = 3 does not divide model.hidden_dim = 64"),
        ({"record": {"logits": True}}, "record.logits = True is not supported"),
        ({"record": {"W": "yes"}}, "record.W must be bool"),
        ({"train": {"foo": 1}}, "unknown key 'train.foo'"),
        ({"trainer": {}}, "unknown section 'trainer'"),
        ({"train": [1, 2]}, "section 'train' must be a mapping"),
        ([1, 2], "top level must be a mapping"),
        ({"paths": {"trajectory": ""}}, "paths.trajectory = '' is empty"),
        ({"tokenizer_corpus": {"n_words": 0}}, "tokenizer_corpus.n_words = 0 must be at least 1"),
        ({"tokenizer_corpus": {"seed": "x"}}, "tokenizer_corpus.seed must be int"),
        ({"tokenizer_corpus": {"build": ["bpe"]}}, "tokenizer_corpus.build = ('bpe',) must be [synthetic] (dvc repro "
         "makes the text) or [] (paths.tokenizer_corpus is your own file)"),
        ({"corpus": {"build": ["bpe"]}}, "[] (paths.corpus is your own file)"),
        ({"tokenizer_corpus": {"vocab": 1}}, "unknown key 'tokenizer_corpus.vocab'"),
    ],
)
def test_bad_params_name_the_key(doc, needle):
    with pytest.raises(ConfigError) as e:
        params_from_dict(doc)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_yaml_1_2_floats_and_overrides(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  learning_rate: 1e-4\n  adam_epsilon: 1E-7\n")
    p = load_params(path, ["train.steps=7", "model.hidden_dim=32", "tracking.uri=null"])
    assert p.train.learning_rate == 1e-4 and p.train.adam_epsilon == 1e-7  # PyYAML alone reads '1e-4' as a string
    assert p.train.steps == 7 and p.model.hidden_dim == 32 and p.tracking.uri is None
    assert p.train.weight_decay == 0.0  # an int 0 in YAML would also be accepted as a float


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML at line 2"):
        load_params(bad)
    with pytest.raises(ConfigError, match="write it as section.key=value"):
        apply_overrides({}, ["steps=3"])


def test_flat_names_match_dvc_set_keys():
    flat = Params().flat()
    assert flat["train.learning_rate"] == 1e-3 and flat["model.hidden_dim"] == 64
    assert len(flat) == sum(len(dataclasses.fields(getattr(Params(), f.name))) for f in dataclasses.fields(Params))


@pytest.mark.parametrize(("override", "message"), [
    ("train.steps=x", "-S train.steps: train.steps must be int, got 'x' (str); fix the value given with -S"),
    ("model.n_head=3", "-S model.n_head: model.n_head = 3 does not divide model.hidden_dim = 64; choose an n_head that "
                       "divides hidden_dim with -S"),
    ("tracking.uri=https://alice:S3cretPW@127.0.0.1:1",
     "-S tracking.uri: tracking.uri = 'https://alice:***@127.0.0.1:1' holds a password, which would be recorded in "
     "every trajectory and tracking run; remove it and set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
     "instead (docs/security.md)"),
])
def test_a_bad_value_given_with_S_is_blamed_on_S_not_params_yaml(override, message):
    """The value came from the command line: the line names the -S key and says to fix it there, keeps a specific
    advice, and never repeats the raw value (a password in it stays starred out)."""
    with pytest.raises(ConfigError) as e:
        load_params(REPO / "params.yaml", [override])
    assert str(e.value) == message
