"""The LSTM baseline's network lives in reptile_gen.models: the baseline follows a
``model`` that is an LSTMNetwork, says in one log line that it has its own network
otherwise, and keeps its checkpoint keys."""

from __future__ import annotations

import logging

import torch

from reptile_gen.algorithms import LSTMBaseline
from reptile_gen.algorithms.lstm import LSTMNetwork as OldPath
from reptile_gen.data.task_spec import TaskSpec
from reptile_gen.models import MLP, LSTMNetwork

SPEC = TaskSpec("discrete", "bits", input_sizes=(3, 3), name="digits", sequential=True)
#: state-dict keys as checkpoints written before the move hold them
KEYS = [
    "model.encoder.tables.0.weight",
    "model.encoder.tables.1.weight",
    "model.prev_embedding.weight",
    "model.body.weight_ih_l0",
    "model.body.weight_hh_l0",
    "model.body.bias_ih_l0",
    "model.body.bias_hh_l0",
    "model.head.weight",
    "model.head.bias",
]


def test_follows_an_lstm_model():
    net = LSTMNetwork(SPEC, hidden_size=4, num_layers=1, embedding_dim=2)
    module = LSTMBaseline(net, SPEC)
    assert module.model is net and OldPath is LSTMNetwork


def test_other_model_is_not_used_and_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="reptile_gen.algorithms.lstm"):
        module = LSTMBaseline(MLP(in_features=4, hidden_sizes=[3]), SPEC, hidden_size=4)
    assert isinstance(module.model, LSTMNetwork) and module.model.body.hidden_size == 4
    lines = [r.getMessage() for r in caplog.records if "own network" in r.getMessage()]
    assert len(lines) == 1 and "model= network (MLP) is not used" in lines[0]


def test_checkpoint_keys_unchanged():
    torch.manual_seed(0)
    assert list(LSTMBaseline(None, SPEC, hidden_size=4, num_layers=1).state_dict()) == KEYS
