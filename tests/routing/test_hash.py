"""Hash router: the properties of docs/routers.md#hash (table persistence, LPT bound, bucket balance on a
corpus sample, no router parameters), MultiHash, token-id plumbing and errors."""

import argparse
import inspect
import io
import json
import random
import string
import textwrap

import pytest
import torch

from moe.config import ModelConfig, MoEConfig, RouterConfig
from moe.layer import MoELayer
from moe.model import MoEModel
from moe.routing.hash import HashRouter
from moe.routing.registry import ROUTERS
from moe.routing.hash import balanced_hash_table, random_hash_table, token_id_hash_table
from tests.routing.invariants import check_routing_invariants

V = 50


def make_router(E=5, **kw):
    kw.setdefault("vocab_size", V)
    return HashRouter(num_experts=E, **kw)


def hash_moe_cfg(E=4, capacity_factor=None, **options):
    return MoEConfig(num_experts=E, expert_hidden_size=8, backend="reference", capacity_factor=capacity_factor,
                     router=RouterConfig(name="hash", options={"vocab_size": V, **options}))


def corpus_ids() -> torch.Tensor:
    """A byte-level corpus sample from a few standard-library sources (every machine has them; no download)."""
    data = b"".join(open(m.__file__, "rb").read() for m in (argparse, inspect, textwrap, string))
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def fitted_balanced(E, counts):
    router = make_router(E=E, hash_function="balanced", vocab_size=counts.numel())
    router.fit_balanced(counts)
    return router


@pytest.mark.parametrize("hash_function,num_hashes", [("random", 1), ("random", 3), ("token_id", 1),
                                                       ("balanced", 1)])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_invariants(hash_function, num_hashes, capacity_factor):
    router = make_router(hash_function=hash_function, num_hashes=num_hashes, capacity_factor=capacity_factor,
                         eval_capacity_factor=capacity_factor, min_capacity=1)
    if hash_function == "balanced":
        router.fit_balanced(torch.arange(V).flip(0).double())
    ids = torch.randint(0, V, (37,))
    r = check_routing_invariants(router, torch.randn(37, 16), ids)
    assert r.losses == {} and "router_entropy" not in r.stats
    if capacity_factor is None:  # every token's weights sum to 1 (N hashes, weight = agreeing hashes / N)
        per_token = torch.zeros(37).index_add_(0, r.token_index, r.weight)
        assert torch.allclose(per_token, torch.ones(37))
    else:
        assert r.stats["dropped_fraction"].item() > 0


def test_registry_options_and_errors():
    assert ROUTERS["hash"] is HashRouter
    with pytest.raises(ValueError, match="set router.options.vocab_size to model.vocab_size"):
        MoELayer(MoEConfig(num_experts=4, router=RouterConfig(name="hash")), hidden_size=8)
    with pytest.raises(ValueError, match="MultiHash\\) needs hash_function 'random'"):
        RouterConfig(name="hash", options={"vocab_size": V, "hash_function": "token_id", "num_hashes": 2})
    with pytest.raises(ValueError, match="router.options.hash_function: 'bigram' is not one of"):
        RouterConfig(name="hash", options={"hash_function": "bigram"})
    with pytest.raises(ValueError, match="router.jitter"):
        MoELayer(MoEConfig(num_experts=4, router=RouterConfig(name="hash", jitter="gumbel",
                                                              options={"vocab_size": V})), hidden_size=8)
    router = make_router()
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="needs the input token ids"):
        router(x)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 50\)"):
        router(x, torch.tensor([0, 1, 2, 50]))
    unfitted = make_router(hash_function="balanced")
    with pytest.raises(RuntimeError, match="has not been fitted"):
        unfitted(x, torch.tensor([0, 1, 2, 3]))


def test_tables_by_hand():
    assert token_id_hash_table(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    # The ParlAI reference: random.seed(42), then randrange(E) for every id in order.
    rng = random.Random(42)
    assert random_hash_table(20, 32)[0].tolist() == [rng.randrange(32) for _ in range(20)]
    # LPT, worked: ids by decreasing count (ties: lower id) are 1(5), 3(4), 0(3), 4(3), 5(3), 2(0); each goes to
    # the lighter bucket: loads [5,0] [5,4] [5,7] [8,7] [8,10]; id 2 has no mass and goes round-robin (to 0).
    assert balanced_hash_table(torch.tensor([3, 5, 0, 4, 3, 3]), 2).tolist() == [1, 0, 0, 1, 0, 1]


def test_lpt_bound():
    # docs/routers.md#hash: the heaviest bucket is at most the mean bucket mass plus the largest single-token count.
    gen = torch.Generator().manual_seed(0)
    for E in (3, 7, 16):
        zipf = 1.0 / torch.arange(1, 501, dtype=torch.float64)
        counts = (zipf * 1e4 * torch.rand(500, generator=gen, dtype=torch.float64)).round()
        counts = counts[torch.randperm(500, generator=gen)]
        table = balanced_hash_table(counts, E)
        mass = torch.zeros(E, dtype=torch.float64).index_add_(0, table, counts)
        assert mass.max() <= mass.mean() + counts.max() + 1e-9
        assert mass.max() < 1.05 * max(mass.mean(), counts.max())  # and close to the best any table can do


def test_bucket_balance_on_corpus_sample():
    # Fit on even 1 KiB chunks of a byte corpus, measure on odd ones: balanced hashing spreads the load nearly
    # evenly (the space byte alone is ~29% of the mass, so max/mean ≥ E·0.29 for any table), random and
    # modulo hashing do not.
    ids = corpus_ids()
    chunks = ids[: ids.numel() // 1024 * 1024].view(-1, 1024)
    fit, held = chunks[0::2].reshape(-1), chunks[1::2].reshape(-1)
    counts = torch.bincount(fit, minlength=256)
    p_max = counts.max().item() / fit.numel()
    x = torch.zeros(held.numel(), 1)
    for E in (3, 4):
        balanced = fitted_balanced(E, counts)(x, held).stats["max_load_ratio"].item()
        rand = make_router(E=E, vocab_size=256)(x, held).stats["max_load_ratio"].item()
        modulo = make_router(E=E, vocab_size=256, hash_function="token_id")(x, held).stats["max_load_ratio"].item()
        assert balanced <= max(1.0, E * p_max) + 0.06, (E, balanced)
        assert balanced + 0.3 < min(rand, modulo), (E, balanced, rand, modulo)


def test_table_persists_through_state_dict_round_trip():
    ids = torch.randint(0, V, (64,))
    x = torch.randn(64, 8)
    for kind in ("random", "balanced"):
        torch.manual_seed(1)
        a = make_router(hash_function=kind, num_hashes=2 if kind == "random" else 1)
        if kind == "balanced":
            a.fit_balanced(torch.rand(V) * 100)
        buf = io.BytesIO()
        torch.save(a.state_dict(), buf)
        assert set(a.state_dict()) == {"table"}
        # A fresh router with another seed / unfitted table, under another global RNG state, then loaded.
        torch.manual_seed(2)
        b = make_router(hash_function=kind, num_hashes=2 if kind == "random" else 1, seed=7)
        assert not torch.equal(a.table, b.table)
        buf.seek(0)
        b.load_state_dict(torch.load(buf, weights_only=True))
        ra, rb = a(x, ids), b(x, ids)
        assert torch.equal(ra.token_index, rb.token_index) and torch.equal(ra.expert_index, rb.expert_index)
        assert torch.equal(ra.weight, rb.weight)


def test_table_independent_of_global_rng_state():
    # Every rank must build the same table whatever its RNG state, and building it must not consume the
    # global Python RNG (docs/routers.md#hash).
    torch.manual_seed(1)
    random.seed(1)
    a = make_router(num_hashes=2).table
    torch.manual_seed(2)
    random.seed(2)
    expected_next = random.Random(2).random()
    b = make_router(num_hashes=2).table
    assert torch.equal(a, b)
    assert random.random() == expected_next


def test_multihash_reduces_to_plain_hashing():
    ids = torch.randint(0, V, (40,))
    x = torch.randn(40, 8)
    plain = make_router()
    multi1 = make_router(num_hashes=1)
    r1, r = plain(x, ids), multi1(x, ids)
    assert torch.equal(r1.expert_index, r.expert_index) and torch.equal(r1.weight, torch.ones(40))
    # N identical hash functions == plain hashing
    multi = make_router(num_hashes=3)
    assert torch.equal(multi.table[0], plain.table[0])  # row 0 is the plain table (same generator stream)
    with torch.no_grad():
        multi.table.copy_(plain.table.expand(3, V))
    r3 = multi(x, ids)
    assert torch.equal(r3.token_index, r1.token_index) and torch.equal(r3.expert_index, r1.expert_index)
    assert torch.equal(r3.weight, r1.weight)


def test_multihash_weights_count_agreeing_hashes():
    router = make_router(E=4, num_hashes=3)
    with torch.no_grad():
        router.table.zero_()
        router.table[:, 1] = torch.tensor([2, 3, 2])
        router.table[:, 2] = torch.tensor([0, 1, 3])
    r = router(torch.randn(3, 8), torch.tensor([0, 1, 2]))
    got = sorted(zip(r.token_index.tolist(), r.expert_index.tolist(), r.weight.tolist()))
    assert got == [(0, 0, 1.0), (1, 2, pytest.approx(2 / 3)), (1, 3, pytest.approx(1 / 3)),
                   (2, 0, pytest.approx(1 / 3)), (2, 1, pytest.approx(1 / 3)), (2, 3, pytest.approx(1 / 3))]
    assert r.stats["experts_per_token"].item() == pytest.approx(6 / 3)


def test_routing_ignores_hidden_state():
    router = make_router(num_hashes=2)
    ids = torch.randint(0, V, (30,))
    a, b = router(torch.randn(30, 8), ids), router(torch.randn(30, 8) * 100, ids)
    assert torch.equal(a.token_index, b.token_index) and torch.equal(a.expert_index, b.expert_index)
    assert torch.equal(a.weight, b.weight)


def test_capacity_drops_in_token_order():
    router = make_router(E=2, hash_function="token_id", capacity_factor=1.0, min_capacity=0)
    ids = torch.tensor([0, 2, 4, 6, 1, 8])  # five tokens to expert 0, capacity ceil(6/2) = 3
    r = router(torch.randn(6, 4), ids)
    assert r.token_index[r.expert_index == 0].tolist() == [0, 1, 2]
    assert r.tokens_per_expert.tolist() == [3, 1]
    assert r.stats["dropped_fraction"].item() == pytest.approx(2 / 6)


def test_no_router_parameters_and_model_step():
    cfg = hash_moe_cfg(E=4, hash_function="random")
    layer = MoELayer(cfg, hidden_size=8)
    assert list(layer.router.parameters()) == []
    torch.manual_seed(0)
    model = MoEModel(ModelConfig(vocab_size=V, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                                 intermediate_size=32, max_position_embeddings=32, moe=cfg))
    ids = torch.randint(0, V, (2, 12))
    out = model(ids, torch.roll(ids, -1, dims=1))
    out.loss.backward()
    assert out.aux_loss.item() == 0.0
    for layer, r in zip(model.layers, out.routings):
        assert list(layer.mlp.router.parameters()) == []
        # the expert of each token is the table entry of its input id, in every MoE layer
        assert torch.equal(r.expert_index, layer.mlp.router.table[0, ids.reshape(-1)][r.token_index])
        # each expert gets gradient only from its own tokens: an expert with none gets none
        g = layer.mlp.experts.w_down_EFD.grad
        used = r.tokens_per_expert > 0
        assert (g[used].abs().sum((1, 2)) > 0).all()
        assert torch.count_nonzero(g[~used]) == 0


def test_token_counts_path(tmp_path):
    counts = list(range(V, 0, -1))
    path = tmp_path / "counts.json"
    path.write_text(json.dumps(counts))
    layer = MoELayer(hash_moe_cfg(E=3, hash_function="balanced", token_counts_path=str(path)), hidden_size=8)
    assert torch.equal(layer.router.table[0], balanced_hash_table(torch.tensor(counts), 3))
    path.write_text(json.dumps(counts[:-1]))
    with pytest.raises(ValueError, match="must hold a JSON list of 50 non-negative numbers"):
        MoELayer(hash_moe_cfg(E=3, hash_function="balanced", token_counts_path=str(path)), hidden_size=8)


def test_kv_cache_decoding_matches_full_sequence():
    # Hash routing is per token and causal: one-token-at-a-time decoding gives the full-sequence logits.
    torch.manual_seed(0)
    model = MoEModel(ModelConfig(vocab_size=V, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                                 intermediate_size=32, max_position_embeddings=32,
                                 moe=hash_moe_cfg(E=4, num_hashes=2))).double().eval()
    ids = torch.randint(0, V, (1, 10))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        step = torch.cat([model(ids[:, :3], cache=cache).logits,
                          *[model(ids[:, t:t + 1], cache=cache).logits for t in range(3, 10)]], dim=1)
    assert torch.allclose(full, step, rtol=0, atol=1e-10)
