"""Router collapse: a warning naming the layer and the expert when one expert computes more than 90% of a
layer's tokens for ``patience`` consecutive steps (``moe.metrics.RouterCollapseWatch``)."""

from __future__ import annotations

import logging

import pytest
import torch

from moe.config import MoEConfig, RouterConfig
from moe.metrics import RouterCollapseWatch, RouterStats
from moe.routing.registry import build_router


def test_worked_example_warns_once_after_patience_steps(caplog):
    """2 layers x 3 experts, top-1 (token share = assignment share). Layer 1 sends 95% of its tokens to expert 0
    at steps 1, 3, 4, 5 (step 2 is 60%: the streak restarts); layer 0 is balanced. Patience 3: the warning comes
    at step 5, once, for (layer 1, expert 0) only."""
    watch = RouterCollapseWatch(patience=3, threshold=0.9)
    balanced = [1 / 3, 1 / 3, 1 / 3]
    layer1 = {1: [0.95, 0.03, 0.02], 2: [0.60, 0.20, 0.20], 3: [0.95, 0.05, 0.0], 4: [0.97, 0.02, 0.01],
              5: [0.91, 0.05, 0.04], 6: [0.99, 0.01, 0.0]}
    warned_at = []
    with caplog.at_level(logging.WARNING, logger="moe.metrics"):
        for step, shares in layer1.items():
            before = len(caplog.records)
            watch.update(torch.tensor([balanced, shares], dtype=torch.float64), step)
            warned_at += [step] * (len(caplog.records) - before)
    assert warned_at == [5]
    message = caplog.records[0].getMessage()
    assert message.startswith("step 5: router collapse in MoE layer 1: expert 0 has computed 91% of the layer's "
                              "tokens for 3 steps (threshold 90%)")
    assert "model.moe.router.aux_loss_coef" in message


def test_layers_where_every_expert_sees_most_tokens_are_not_flagged(caplog):
    """Top-2 of 2 experts: each expert computes every token by design (balanced share 1.0)."""
    watch = RouterCollapseWatch(patience=1)
    with caplog.at_level(logging.WARNING, logger="moe.metrics"):
        for step in range(1, 4):
            watch.update(torch.tensor([[1.0, 1.0]]), step)
    assert not caplog.records


def test_a_collapsed_top2_router_is_caught_through_router_stats(caplog):
    """A real top-2 router whose weights make expert 2 every token's first choice: expert 2 has 50% of the
    assignments (the most any expert can have at k=2) but 100% of the tokens, which is what is flagged."""
    torch.manual_seed(0)
    router = build_router(MoEConfig(num_experts=4, expert_hidden_size=8, router=RouterConfig(top_k=2)), 8)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[2] = 5.0  # x·w = 5·Σx: positive inputs all pick expert 2 first
        router.weight[1] = torch.linspace(-1, 1, 8)
    watch = RouterCollapseWatch(patience=2)
    with caplog.at_level(logging.WARNING, logger="moe.metrics"):
        for step in (1, 2):
            stats = RouterStats()
            for _ in range(2):  # two micro-batches of 10 tokens
                stats.add([router(torch.rand(10, 8) + 0.1)])
            assert stats.load_matrix()[0, 2].item() == pytest.approx(0.5)
            assert stats.token_share_matrix()[0, 2].item() == pytest.approx(1.0)
            assert stats.token_share_matrix()[0].sum().item() == pytest.approx(2.0)  # k experts per token
            watch.update(stats.token_share_matrix(), step)
    assert [r.getMessage().split(" of the")[0] for r in caplog.records] == [
        "step 2: router collapse in MoE layer 0: expert 2 has computed 100%"]


@pytest.mark.parametrize("kwargs,message", [({"patience": 0}, "patience must be >= 1"),
                                            ({"patience": 5, "threshold": 1.5}, r"threshold must be in \(0, 1\]")])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RouterCollapseWatch(**kwargs)
