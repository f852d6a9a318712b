"""Router noise (docs/routers.md#jitter): identity in eval, input_jitter never reaches the experts, each variant
does what its row of the table says, and every router reads it from the config."""

import pytest
import torch

from moe.config import MoEConfig, RouterConfig
from moe.layer import MoELayer
from moe.routing.registry import build_router
from moe.routing.gshard import GShardRouter
from moe.routing.jitter import JITTERS, Jitter
from moe.routing.sigmoid import SigmoidRouter
from moe.routing.switch import SwitchRouter
from moe.routing.topk import TopKRouter
from tests.routing.helpers import identity_gate

NOISY = [kind for kind in JITTERS if kind != "none"]


def make(name, jitter="none", eps=0.3, D=8, E=6):
    common = dict(hidden_size=D, num_experts=E, jitter=jitter, jitter_eps=eps)
    if name == "topk":
        return TopKRouter(top_k=2, **common)
    if name == "sigmoid":
        return SigmoidRouter(top_k=2, **common)
    if name == "switch":
        return SwitchRouter(**common)
    return GShardRouter(**common)


@pytest.mark.parametrize("name", ["topk", "sigmoid", "switch", "gshard"])
@pytest.mark.parametrize("kind", NOISY)
def test_every_variant_is_the_identity_in_eval(name, kind):
    clean, noisy = make(name), make(name, kind)
    noisy.load_state_dict(clean.state_dict())
    x = torch.randn(40, 8, dtype=torch.float64)
    clean.eval(), noisy.eval()
    a, b = clean(x), noisy(x)
    assert torch.equal(a.expert_index, b.expert_index) and torch.equal(a.token_index, b.token_index)
    assert torch.equal(a.weight, b.weight)
    for key in a.losses:
        assert torch.equal(a.losses[key], b.losses[key]), key
    # ... and not in training, so the comparison above can fail.
    noisy.train()
    c = noisy(x)
    assert not (torch.equal(a.expert_index, c.expert_index) and torch.equal(a.weight, c.weight))


@pytest.mark.parametrize("kind", JITTERS)
def test_hooks_return_their_argument_in_eval(kind):
    jitter = Jitter(kind, 0.5).eval()
    x = torch.randn(5, 4)
    assert jitter.router_input(x) is x and jitter.logits(x) is x and jitter.selection(x) is x


def test_input_jitter_never_changes_the_experts_input():
    cfg = MoEConfig(num_experts=4, expert_hidden_size=6, router=RouterConfig(top_k=2, jitter="input_jitter",
                                                                             jitter_eps=0.5))
    layer = MoELayer(cfg, 8).double().train()
    seen = []
    forward_combine = layer.experts.forward_combine
    layer.experts.forward_combine = lambda x_TD, *args: seen.append(x_TD.clone()) or forward_combine(x_TD, *args)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    x_before = x.clone()
    _, routing_train = layer(x)
    assert torch.equal(x, x_before), "the layer input was modified in place"
    assert torch.equal(seen[0], x_before.reshape(10, 8)), "the experts saw a jittered input"
    # The router itself did see a jittered input: its weights differ from the clean (eval) ones.
    layer.eval()
    _, routing_eval = layer(x)
    assert not torch.equal(routing_train.weight, routing_eval.weight)


def test_input_jitter_multiplies_the_router_input_by_uniform_factors():
    jitter = Jitter("input_jitter", 0.1).train()
    x = torch.randn(2000, 8, dtype=torch.float64)
    x_before = x.clone()
    ratio = jitter.router_input(x) / x
    assert torch.equal(x, x_before)
    assert ratio.min() >= 0.9 and ratio.max() <= 1.1
    assert ratio.min() < 0.901 and ratio.max() > 1.099  # spans the whole interval
    assert abs(ratio.mean().item() - 1.0) < 2e-3
    assert torch.equal(jitter.logits(x), x) and torch.equal(jitter.selection(x), x)


def test_logit_mult_jitter_multiplies_the_logits_by_uniform_factors():
    jitter = Jitter("logit_mult_jitter", 0.2).train()
    z = torch.randn(2000, 8, dtype=torch.float64)
    ratio = jitter.logits(z) / z
    assert ratio.min() >= 0.8 and ratio.max() <= 1.2 and ratio.min() < 0.801 and ratio.max() > 1.199
    assert torch.equal(jitter.router_input(z), z) and torch.equal(jitter.selection(z), z)


def test_gumbel_argmax_samples_from_the_softmax_and_the_weights_stay_clean():
    # A top-1 softmax router whose logits are z for every token: the chosen expert must be distributed as
    # softmax(z), and the weight must be the clean probability of the chosen expert.
    z = torch.tensor([1.0, 0.0, -1.0, 0.5], dtype=torch.float64)
    router = identity_gate(TopKRouter(hidden_size=4, num_experts=4, top_k=1, renormalize=False, aux_loss_coef=0.0,
                                      jitter="gumbel").double().train())
    N = 200_000
    r = router(z.expand(N, 4))
    freq = torch.bincount(r.expert_index, minlength=4).double() / N
    probs = torch.softmax(z, -1)
    assert (freq - probs).abs().max() < 0.005  # 4.5 standard errors at most
    assert torch.equal(r.weight, probs[r.expert_index])


def test_bad_names_and_eps_are_value_errors():
    with pytest.raises(ValueError, match="router.jitter: unknown jitter 'noise'; valid: none, input_jitter"):
        Jitter("noise")
    with pytest.raises(ValueError, match=r"router.jitter_eps must be in \[0, 1\)"):
        Jitter("input_jitter", 1.0)


@pytest.mark.parametrize("name", ["topk", "sigmoid", "switch", "gshard"])
def test_every_router_reads_the_jitter_from_the_config(name):
    k, renorm = (1, False) if name == "switch" else (2, True)
    rc = RouterConfig(name=name, top_k=k, renormalize=renorm, aux_loss_coef=0.0, jitter="logit_mult_jitter",
                      jitter_eps=0.05)
    router = build_router(MoEConfig(num_experts=4, router=rc), 8)
    assert (router.jitter.kind, router.jitter.eps) == ("logit_mult_jitter", 0.05)
