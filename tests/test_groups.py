"""param_groups(model): the paper's managed tensors, on the architectures people
fine-tune (built from configs, random weights: nothing is downloaded)."""
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from dps_fast import param_groups
from dps_fast.tiny import TinyEncoder


def _names(model, **kwargs):
    """(managed, plain with decay, plain without decay) parameter names, and the warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = param_groups(model, **kwargs)
    names = {id(p): n for n, p in model.named_parameters()}
    by_kind = {True: [], "decay": [], "no decay": []}
    for group in groups:
        kind = True if group.get("dps", True) else "decay" if group["weight_decay"] else "no decay"
        by_kind[kind] += [names[id(p)] for p in group["params"]]
    everything = sum(by_kind.values(), [])
    assert len(everything) == len(set(everything)) == len(list(model.parameters()))  # each tensor once
    return by_kind[True], by_kind["decay"], by_kind["no decay"], [str(w.message) for w in caught]


def test_tiny_encoder_follows_the_paper():
    model = TinyEncoder(vocab=16, dim=16, layers=1, heads=2, length=8)
    groups = param_groups(model, weight_decay=0.02)
    managed, decayed, undecayed, caught = _names(model, weight_decay=0.02)
    assert all(n.endswith("weight") and "norm" not in n for n in managed)
    assert "pooler.weight" in managed and "classifier.weight" in managed and "blocks.0.query.weight" in managed
    assert sorted(decayed) == ["embed.weight", "position"]
    assert "blocks.0.norm1.weight" in undecayed and "classifier.bias" in undecayed
    assert [g["weight_decay"] for g in groups] == [0.02, 0.02, 0.0]
    assert [g.get("dps", True) for g in groups] == [True, False, False] and not caught


def test_gpt2_manages_its_conv1d_layers_and_not_the_tied_embedding():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=8,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    managed, decayed, undecayed, caught = _names(model)
    assert sorted(managed) == sorted(f"transformer.h.{i}.{m}.weight" for i in range(2)
                                     for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert sorted(decayed) == ["transformer.wpe.weight", "transformer.wte.weight"]  # embeddings: never masked
    assert "transformer.h.0.attn.c_attn.bias" in undecayed and not caught


def test_bert_manages_every_linear_layer():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32)
    model = transformers.BertForSequenceClassification(config)
    managed, decayed, undecayed, caught = _names(model)
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(managed) == sorted(f"{n}.weight" for n in linear) and len(managed) == 2 * 6 + 2
    assert all("embeddings" in n for n in decayed) and not caught
    assert all(n.endswith("bias") or "LayerNorm" in n for n in undecayed)


def test_transformer_encoder_layer_manages_the_packed_projection():
    model = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    managed, decayed, undecayed, caught = _names(model)
    assert sorted(managed) == ["linear1.weight", "linear2.weight", "self_attn.in_proj_weight",
                               "self_attn.out_proj.weight"]
    assert "self_attn.in_proj_bias" in undecayed and not decayed and not caught
    separate = nn.MultiheadAttention(16, 2, kdim=8, vdim=4, add_bias_kv=True)  # q/k/v_proj_weight, bias_k/v
    managed, _, undecayed, _ = _names(separate)
    assert sorted(managed) == ["k_proj_weight", "out_proj.weight", "q_proj_weight", "v_proj_weight"]
    assert {"bias_k", "bias_v", "in_proj_bias"} <= set(undecayed)


def test_weights_it_does_not_know_are_named_in_a_warning():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(nn.init.normal_(nn.Linear(4, 4).weight.detach().clone()))

    model = nn.Sequential(nn.Conv2d(3, 4, 3), Custom(), nn.Linear(4, 2))
    managed, decayed, _, caught = _names(model)
    assert managed == ["2.weight"] and sorted(decayed) == ["0.weight", "1.weight"]
    assert len(caught) == 1 and "0.weight, 1.weight" in caught[0] and "stay plain AdamW" in caught[0]


def test_frozen_parameters_and_empty_groups_are_left_out():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    model[0].weight.requires_grad_(False)
    groups = param_groups(model)
    assert all(g["params"] for g in groups) and all(g.get("dps") is False for g in groups)


def test_parametrized_weights_manage_their_largest_original():
    """weight_norm (g, v), spectral_norm and orthogonal on linear layers: DPS manages the
    original with the weight's entries (v, original); weight_norm's magnitude g stays plain
    AdamW and is named; a parametrized LayerNorm weight and bias stay undecayed, a
    parametrized embedding plain with decay."""
    class Scale(nn.Module):
        def forward(self, x):
            return 2 * x

    norm = nn.LayerNorm(4)
    parametrize.register_parametrization(norm, "weight", Scale())
    parametrize.register_parametrization(norm, "bias", Scale())
    embedding = nn.Embedding(6, 4)
    parametrize.register_parametrization(embedding, "weight", Scale())
    model = nn.Sequential(embedding, parametrizations.weight_norm(nn.Linear(4, 4)),
                          parametrizations.spectral_norm(nn.Linear(4, 4)),
                          parametrizations.orthogonal(nn.Linear(4, 4)), norm)
    managed, decayed, undecayed, caught = _names(model)
    assert managed == ["1.parametrizations.weight.original1", "2.parametrizations.weight.original",
                       "3.parametrizations.weight.original"]
    assert decayed == ["0.parametrizations.weight.original", "1.parametrizations.weight.original0"]
    assert undecayed == ["1.bias", "2.bias", "3.bias", "4.parametrizations.weight.original",
                         "4.parametrizations.bias.original"]
    assert len(caught) == 1 and "1.parametrizations.weight.original0" in caught[0]
    assert "0.parametrizations" not in caught[0]  # the embedding's is never masked, so not named


def test_a_weight_normalised_model_trains_with_dps():
    from dps_fast import DPSAdamW

    torch.manual_seed(0)
    model = nn.Sequential(parametrizations.weight_norm(nn.Linear(8, 8)), nn.ReLU(), nn.Linear(8, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # g is named, as tested above
        opt = DPSAdamW(param_groups(model), lr=1e-2, stage_steps=2)
    direction = model[0].parametrizations.weight.original1
    x = torch.randn(16, 8)
    for _ in range(4):  # explore 1-2, exploit 3-4
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    assert opt.mask(direction) is not None and opt.mask(direction).float().mean() >= 0.7


def test_hook_based_weight_norm_and_spectral_norm():
    """The older torch.nn.utils.weight_norm / spectral_norm keep weight_g, weight_v /
    weight_orig in place of the weight: v and weight_orig are managed, g is named."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates the hook-based weight_norm
        model = nn.Sequential(nn.utils.weight_norm(nn.Linear(8, 4)), nn.utils.spectral_norm(nn.Linear(4, 4)))
    managed, decayed, undecayed, caught = _names(model)
    assert managed == ["0.weight_v", "1.weight_orig"] and decayed == ["0.weight_g"]
    assert undecayed == ["0.bias", "1.bias"]
    assert len(caught) == 1 and "0.weight_g" in caught[0]
