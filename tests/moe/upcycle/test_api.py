"""The upcycling API: option parsing and validation, layer selection, the derived config, the report."""

import json

import pytest
import torch

from moe.config import ModelConfig, MoEConfig, RouterConfig
from moe.ffn import SwiGLU
from moe.layer import MoELayer
from moe.upcycle import (
    UPCYCLE_METHODS,
    parse_method_options,
    select_layers,
    target_moe_config,
    upcycle,
    upcycle_with_report,
)
from tests.moe.upcycle.common import dense_ffn, dense_model, moe_cfg


def test_unknown_method_lists_the_valid_ones():
    assert UPCYCLE_METHODS == ("copy", "neuron-split", "drop", "granular")
    valid = "valid methods: copy, neuron-split, drop, granular"
    with pytest.raises(ValueError, match=rf"unknown upcycling method 'split'; {valid}"):
        upcycle(dense_model(num_layers=1), moe_cfg(E=2, k=1, M=24), "split", seed=0)


@pytest.mark.parametrize("method, options, message", [
    ("copy", {"ratio": 0.5},
     r"unknown key upcycle.copy.ratio; valid keys of upcycle.copy: noise_ratio, noise_std, router_init"),
    ("drop", {"ratio": 1.5}, r"upcycle.drop.ratio must be in \[0, 1\], got 1.5"),
    ("drop", {"router_init": "xavier"},
     r"upcycle.drop.router_init: 'xavier' is not one of 'normal' \| 'zero' \| 'uniform'"),
    ("granular", {"granularity": 0}, r"upcycle.granular.granularity must be >= 1, got 0"),
    ("granular", {"scale_mode": "both"}, r"upcycle.granular.scale_mode: 'both' is not one of 'down' \| 'megatron'"),
    ("neuron-split", {"split": "metis"}, r"upcycle.neuron-split.split: 'metis' is not one of 'random' \| 'clustering'"),
    ("neuron-split", {"scale": -1.0}, r"upcycle.neuron-split.scale must be > 0 or null, got -1.0"),
])
def test_bad_options_raise_one_line_errors_naming_the_option(method, options, message):
    with pytest.raises(ValueError, match=message):
        upcycle(dense_model(num_layers=1), moe_cfg(E=4, k=2, M=24), method, seed=0, **options)


def test_parse_method_options_reads_typed_values_and_rejects_bad_items():
    items = ["granularity=8", "scale_mode=megatron", "scale=null", "virtual_groups=false"]
    got = parse_method_options("granular", items)
    assert got == {"granularity": 8, "scale_mode": "megatron", "scale": None, "virtual_groups": False}
    assert parse_method_options("drop", ["ratio=5e-1"]) == {"ratio": 0.5}
    assert parse_method_options("copy", []) == {}
    with pytest.raises(ValueError, match="is not of the form"):
        parse_method_options("drop", ["ratio"])
    with pytest.raises(ValueError, match="plain key"):
        parse_method_options("drop", ["a.b=1"])
    with pytest.raises(ValueError, match="upcycle.drop.ratio: expected a number, got 'half'"):
        parse_method_options("drop", ["ratio=half"])
    with pytest.raises(ValueError, match="unknown upcycling method"):
        parse_method_options("moefication", [])


def test_target_moe_config_derives_the_expert_width_and_the_layer_pattern():
    dense_cfg = ModelConfig(hidden_size=16, num_layers=4, num_heads=2, num_kv_heads=1, intermediate_size=24, moe=None)
    base = MoEConfig(router=RouterConfig(renormalize=False, aux_loss_coef=0.02))
    copy = target_moe_config(dense_cfg, "copy", num_experts=8, top_k=2, base=base)
    assert (copy.num_experts, copy.router.top_k, copy.expert_hidden_size) == (8, 2, 24)
    assert copy.router.renormalize is False and copy.router.aux_loss_coef == 0.02
    assert target_moe_config(dense_cfg, "neuron-split", num_experts=4, top_k=4).expert_hidden_size == 6
    granular = target_moe_config(dense_cfg, "granular", num_experts=8, top_k=4, granularity=4, layers="every_other")
    assert granular.expert_hidden_size == 6
    assert (granular.first_dense_layers, granular.moe_every) == (1, 2)
    assert [i for i in range(4) if granular.is_moe_layer(i)] == [1, 3]


def test_layer_selection_converts_exactly_the_chosen_layers():
    dense = dense_model(num_layers=4)
    moe = upcycle(dense, moe_cfg(E=2, k=1, M=24), "copy", seed=0, layers="every_other")
    assert (moe.cfg.moe.first_dense_layers, moe.cfg.moe.moe_every) == (1, 2)
    assert [type(layer.mlp) for layer in moe.layers] == [SwiGLU, MoELayer, SwiGLU, MoELayer]
    for i in (0, 2):  # dense FFNs of unconverted layers are bitwise copies
        for got, want in zip(dense_ffn(moe, i), dense_ffn(dense, i)):
            assert torch.equal(got, want)
    offset0 = upcycle(dense, moe_cfg(E=2, k=1, M=24), "copy", seed=0, layers="every_other", every_other_offset=0)
    assert [layer.is_moe for layer in offset0.layers] == [True, False, True, False]
    assert [layer.is_moe for layer in upcycle(dense, moe_cfg(E=2, k=1, M=24), "copy", seed=0,
                                             layers=[0, 3]).layers] == [True, False, False, True]
    # None follows the config's own pattern.
    cfg = moe_cfg(E=2, k=1, M=24, first_dense_layers=2)
    assert [layer.is_moe for layer in upcycle(dense, cfg, "copy", seed=0).layers] == [False, False, True, True]


@pytest.mark.parametrize("layers, cfg_kw, message", [
    ([0, 1, 3], {}, r"layers \[0, 1, 3\] cannot be expressed by moe.first_dense_layers and moe.moe_every"),
    ([4], {}, r"layers: index 4 is out of range for a 4-layer model \(0..3\)"),
    ("odd", {}, r"layers: unknown selection 'odd'; valid: 'all', 'every_other' or a list of indices"),
    ("all", {"moe_every": 2}, r"layers='all' selects \[0, 1, 2, 3\] but moe.first_dense_layers=0, moe.moe_every=2"),
    ([], {}, r"layers: \[\] selects no layer"),
])
def test_bad_layer_selections_raise(layers, cfg_kw, message):
    with pytest.raises(ValueError, match=message):
        upcycle(dense_model(num_layers=4), moe_cfg(E=2, k=1, M=24, **cfg_kw), "copy", seed=0, layers=layers)


def test_select_layers():
    assert select_layers("all", 3) == [0, 1, 2]
    assert select_layers("every_other", 5) == [1, 3]
    assert select_layers((3, 1), 4) == [1, 3]
    with pytest.raises(ValueError, match="duplicate"):
        select_layers([1, 1], 4)


def test_the_target_must_fit_the_dense_model():
    dense = dense_model(num_layers=1, F=24)
    with pytest.raises(ValueError, match=r"moe.expert_hidden_size must be 24 for method copy .* got 12"):
        upcycle(dense, moe_cfg(E=2, k=1, M=12), "copy", seed=0)
    with pytest.raises(ValueError, match=r"moe.expert_hidden_size must be 6 for method neuron-split"):
        upcycle(dense, moe_cfg(E=4, k=1, M=24), "neuron-split", seed=0)
    with pytest.raises(ValueError, match=r"moe.num_shared_experts must be 0 for upcycling"):
        upcycle(dense, moe_cfg(E=2, k=1, M=24, num_shared_experts=1), "copy", seed=0)
    moe = upcycle(dense, moe_cfg(E=2, k=1, M=24), "copy", seed=0)
    with pytest.raises(ValueError, match=r"upcycle needs a dense MoEModel \(model.moe: null\); got an MoE model"):
        upcycle(moe, moe_cfg(E=2, k=1, M=24), "copy", seed=0)
    with pytest.raises(ValueError, match="seed must be an integer"):
        upcycle(dense, moe_cfg(E=2, k=1, M=24), "copy", seed=1.5)


def test_report_lists_scales_expected_exactness_and_probe_errors():
    dense = dense_model(num_layers=2)
    _, exact = upcycle_with_report(dense, moe_cfg(E=4, k=2, M=24), "copy", seed=0)
    assert [(e.layer, e.scale, e.exact_expected) for e in exact.layers] == [(0, 1.0, True), (1, 1.0, True)]
    assert all(e.max_abs_error < 1e-12 for e in exact.layers)
    _, dropped = upcycle_with_report(dense, moe_cfg(E=4, k=2, M=24), "drop", seed=0, ratio=0.5)
    assert not any(e.exact_expected for e in dropped.layers) and all(e.max_abs_error > 1e-3 for e in dropped.layers)
    data = json.loads(json.dumps(dropped.to_dict()))
    assert data["method"] == "drop" and data["options"]["ratio"] == 0.5 and len(data["layers"]) == 2
    _, unmeasured = upcycle_with_report(dense, moe_cfg(E=4, k=2, M=24), "copy", seed=0, probe_tokens=0)
    assert all(e.max_abs_error is None for e in unmeasured.layers)
