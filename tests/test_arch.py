import pytest
import torch

from teal.arch import PROJ_SITE, UnsupportedArchitectureError, get_adapter
from conftest import tiny_model


def test_adapter_finds_all_projections(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    projs = adapter.projections()
    n = model.config.num_hidden_layers
    assert len(projs) == 7 * n
    assert all(isinstance(m, torch.nn.Linear) for m in projs.values())
    assert "layers.1.k" in adapter.sites()["layers.1.attn_in"]
    sites = adapter.sites()
    assert len(sites) == 4 * n
    assert sites["layers.0.mlp_in"] == ["layers.0.gate", "layers.0.up"]
    assert set(PROJ_SITE.values()) == {s.split(".")[-1] for s in sites}


def test_unsupported_architecture_is_named():
    import transformers as tf

    cfg = tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'.*not supported.*llama"):
        get_adapter(tf.GPT2LMHeadModel(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="no `.config`"):
        get_adapter(torch.nn.Linear(2, 2))
