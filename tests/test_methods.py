"""Methods: denoisers mean what they say, FLOP counts match the computed graph, and the new
objectives' validation numbers are what the exact-identity tests prove.

  * BD3-LM's denoiser (block-causal mask, clean prefix at σ̄ = 0) gives the two-pass training
    forward's logits for the block being denoised, token for token.
  * AR's denoiser is causal and normalised; CTMC's x0 probabilities never predict the mask and
    keep unmasked tokens; SEDD's log-score is 0 at the own token.
  * CTMC: the method's evaluation loss is an unbiased estimate of the exact bound
    (`ctmc_nelbo_exact`, proven against -log p by test_csm_ctmc) for a real network.
  * CSM: the method's exact loss is the trainable objective J, which differs from
    E‖c_θ − c_p‖² by a θ-free constant; its pseudo-likelihood of the true score is the true
    conditional NLL.
  * FLOPs: the attention term of every pattern (two-pass training included) equals the
    score/value FLOPs of the attention's own graph, for the dense and the xla backend; the
    experiment's count leaves out the gathered embedding table.
"""
import functools
import math
import os
import sys

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dlm_jax import oracles, registry
from dlm_jax.methods import ConcreteScoreMatching, ContinuousTimeELBO
from dlm_jax.methods.base import attention_flops, score_pairs
from dlm_jax.models.attention import MaskPattern, attend
from dlm_jax.models import DiT
from dlm_jax.objectives import csm
from dlm_jax.objectives.ctmc import ctmc_nelbo_exact
from dlm_jax.processes import schedules, transitions

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import tiny  # noqa: E402


def _experiment(arg, **model):
    """A tiny experiment from configs/tiny.py's `arg` (or a Config) with model fields set, and
    its model with O(1) random parameters."""
    cfg = tiny.get_config(arg) if isinstance(arg, str) else arg
    cfg.mesh.shape = (1, 1, 1)
    for k, v in model.items():
        setattr(cfg.model, k, v)
    exp = registry.build(cfg)
    params = nnx.to_pure_dict(nnx.split(exp.new_model(0))[1])
    # A trained-looking model: random (not zero-initialised) output layers.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape)
                                       for x, k in zip(leaves, keys)])
    return exp, exp.model(params)


def test_bd3lm_denoiser_equals_the_two_pass_training_forward():
    exp, model = _experiment("bd3lm,block=8", time_conditioning=True)
    method = exp.method
    B, L, lb = 2, exp.cfg.data.seq_len, method.block_size
    k1, k2 = jax.random.split(jax.random.key(0))
    x0 = jax.random.randint(k1, (B, L), 0, exp.token_vocab)
    xt = jnp.where(jax.random.bernoulli(k2, 0.5, (B, L)), method.process.mask_id, x0)
    sigma = jnp.repeat(jnp.asarray([[0.3, 1.1, 2.0, 0.7]] * B), lb, axis=1)   # per block
    train_logits = jax.jit(lambda a, b, s: model.two_pass(a, b, s, lb))(xt, x0, sigma)
    den = method.denoiser(model)
    assert den.kind == "x0_log_probs"
    fn = jax.jit(den.fn)
    for b in range(L // lb):
        cur = slice(b * lb, (b + 1) * lb)
        # Clean blocks < b, the noisy block b, and noise after it (which b must not see).
        seq = jnp.concatenate([x0[:, :b * lb], xt[:, cur],
                               jnp.full((B, L - (b + 1) * lb), method.process.mask_id)], 1)
        sig = jnp.where(jnp.arange(L) < b * lb, 0.0, sigma)
        want = jax.nn.log_softmax(jnp.where(jnp.arange(train_logits.shape[-1])
                                            == method.process.mask_id, -1e6,
                                            train_logits[:, cur]), -1)
        got = fn(seq, sig)[:, cur]
        unmasked = xt[:, cur] != method.process.mask_id
        real = slice(0, method.process.mask_id)          # the mask column is -1e6 in both
        got_r = np.where(unmasked[..., None], 0.0, got[..., real])
        want_r = np.where(unmasked[..., None], 0.0, want[..., real])
        np.testing.assert_allclose(got_r, want_r, atol=5e-6 * np.abs(want_r).max() + 1e-5)
        # Carry-over: an unmasked token is kept with probability 1.
        np.testing.assert_array_equal(
            np.where(unmasked, jnp.argmax(got, -1), -1), np.where(unmasked, xt[:, cur], -1))


def test_ar_denoiser_is_causal_and_normalised():
    exp, model = _experiment("ar")
    den = exp.method.denoiser(model)
    assert den.kind == "next_token_log_probs"
    x = jax.random.randint(jax.random.key(0), (2, 32), 0, exp.token_vocab)
    out = den.fn(x)
    np.testing.assert_allclose(jax.nn.logsumexp(out, -1), 0.0, atol=1e-5)
    changed = den.fn(x.at[:, 20].set((x[:, 20] + 1) % exp.token_vocab))
    np.testing.assert_array_equal(out[:, :20], changed[:, :20])
    assert not np.allclose(out[:, 20:], changed[:, 20:])


def test_ctmc_and_sedd_denoisers():
    exp, model = _experiment("ctmc")
    mask = exp.method.process.mask_id
    x = jax.random.randint(jax.random.key(0), (2, 32), 0, exp.token_vocab)
    xt = x.at[:, ::3].set(mask)
    den = exp.method.denoiser(model)
    probs = den.fn(xt, jnp.asarray([0.5, 2.0]))
    assert den.kind == "x0_probs"
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert float(probs[..., mask].max()) == 0.0
    np.testing.assert_array_equal(jnp.take_along_axis(probs, xt[..., None], -1)[..., 0][
        xt != mask], 1.0)

    exp, model = _experiment("sedd")
    den = exp.method.denoiser(model)
    score = den.fn(xt, jnp.asarray([0.5, 2.0]))
    assert den.kind == "log_score"
    np.testing.assert_array_equal(jnp.take_along_axis(score, xt[..., None], -1), 0.0)


@pytest.mark.parametrize("process_name", ["absorbing", "uniform"])
def test_ctmc_validation_loss_estimates_the_exact_bound(process_name):
    """Mean of the method's evaluation loss over many draws = the exact bound / L (±4 s.e.)."""
    V, L = 2, 3
    process = transitions.make_process(process_name, V)
    schedule = schedules.LogLinear(1e-3)
    method = ContinuousTimeELBO(process=process, schedule=schedule)
    model = DiT(process.num_states, 16, 1, 2, cond_dim=8, time_conditioning=True, dropout=0.0,
                rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    params = jax.tree.map(lambda x: x + 0.5 * jax.random.normal(jax.random.key(2), x.shape),
                          params)
    model = nnx.merge(graphdef, params)
    x0 = jnp.asarray([[0, 1, 1]], jnp.int32)
    bound, _ = ctmc_nelbo_exact(process, schedule, method.denoiser(model).fn, x0,
                                num_points=64, ref_probs=method.reference_probs())
    rows = 256
    batch = {"tokens": jnp.tile(x0, (rows, 1))}

    @jax.jit
    def draw(key):
        return method.loss(model, batch, key, train=False)[0]

    draws = np.asarray(jax.lax.map(draw, jax.random.split(jax.random.key(3), 24)))
    mean, se = draws.mean(), draws.std(ddof=1) / math.sqrt(len(draws))
    assert abs(mean - float(bound[0]) / L) < 4 * se + 1e-4, (mean, se, float(bound[0]) / L)


def test_csm_method_loss_is_the_trainable_objective():
    S, L = 3, 2
    joint = oracles.random_joint(0, S, L)
    xs = oracles.all_sequences(S, L)
    p = jnp.asarray(joint).reshape(-1)
    method = ConcreteScoreMatching(num_states=S, seq_len=L, estimator="exact")
    model = DiT(S, 16, 1, 2, cond_dim=8, dropout=0.0, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape),
                          params)
    model = nnx.merge(graphdef, params)
    one = jax.jit(lambda x: method.loss(model, {"tokens": x[None]}, jax.random.key(0),
                                        train=False)[0] * L)
    per_seq = jnp.stack([one(x) for x in xs])
    score = method.denoiser(model).fn(xs)
    truth = csm.concrete_score_table(jnp.asarray(joint), xs)
    explicit, _ = csm.csm_explicit(score, truth, xs)
    const = (p * (truth ** 2).sum((-2, -1))).sum()
    np.testing.assert_allclose((p * per_seq).sum() + const, (p * explicit).sum(), rtol=1e-4,
                               atol=1e-5)


def test_csm_pseudo_likelihood_of_the_true_score_is_the_conditional_nll():
    S, L = 3, 3
    joint = np.asarray(oracles.random_joint(1, S, L))
    xs = oracles.all_sequences(S, L)
    raw = jnp.log1p(csm.concrete_score_table(jnp.asarray(joint), xs))   # log ratios
    got = ConcreteScoreMatching.pseudo_nll(raw, xs, {"tokens": xs})
    brute = []
    for x in np.asarray(xs):
        for i in range(L):
            col = [joint[tuple(np.r_[x[:i], y, x[i + 1:]])] for y in range(S)]
            brute.append(-math.log(col[x[i]] / sum(col)))
    np.testing.assert_allclose(float(got), np.mean(brute), rtol=1e-5)


def _dot_flops(fn, *args) -> float:
    """FLOPs of every dot_general in fn's graph (2 · output size · contracted size); a scan's
    body counts `length` times, a cond its dearest branch."""
    def walk(jaxpr) -> float:
        total = 0.0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                (lc, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
                    lhs[d] for d in lc)
            inner = [walk(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params)]
            if eqn.primitive.name == "cond":
                total += max(inner, default=0.0)
                continue
            if eqn.primitive.name == "while" and sum(inner):
                raise AssertionError("dots inside a while loop: its trip count is not in the "
                                     "graph, so this count cannot be checked")
            total += sum(inner) * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
        return total
    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


# L 32: one flash tile; L 640: several, the last ones padded.
@pytest.mark.parametrize("L", [32, 640])
@pytest.mark.parametrize("block", [4, 8, 32])
@pytest.mark.parametrize("backend", ["dense", "xla"])
def test_two_pass_flop_count_matches_the_attention_graph(block, backend, L):
    exp, _ = _experiment(f"bd3lm,block={block}")
    H, Dh, D = 2, 8, 16
    method = registry.METHODS["nelbo"](exp.cfg, exp.token_vocab)
    counted = method.flops_per_token(num_params=0, depth=3, width=D, seq_len=L,
                                     attention=backend)
    if not method.blocks:  # one block: plain bidirectional attention over L keys
        np.testing.assert_allclose(counted, attention_flops(
            3, D, score_pairs(MaskPattern("full"), L, L, backend) / L), rtol=1e-12)
        return
    q, k, v = (jax.random.normal(kk, (1, 2 * L, H, Dh)) for kk in
               jax.random.split(jax.random.key(0), 3))
    pattern = MaskPattern("two_pass", block)

    def layer(q, k, v):
        return attend(q, k, v, pattern, backend=backend)
    full_layer = _dot_flops(layer, q, k, v)
    last_layer = _dot_flops(layer, q[:, :L], k, v)
    measured = 3.0 * (2 * full_layer + last_layer) / L    # depth 3; fwd + bwd = 3 × fwd
    np.testing.assert_allclose(counted, measured, rtol=1e-6)
    if backend == "dense":  # the block-sparse count, by hand, below the dense two-pass count
        assert counted == attention_flops(1, D, 2 * (2 * L + block) + L + block)
        assert counted < 2 * attention_flops(3, D, 2 * L)


@pytest.mark.parametrize("L", [64, 640, 1024])
@pytest.mark.parametrize("kind", ["full", "causal", "block_causal", "two_pass"])
@pytest.mark.parametrize("backend", ["dense", "xla"])
def test_score_pairs_match_the_attention_graph(kind, backend, L):
    """score_pairs · 4·Dh·H·B = the forward dots of `attend` with that backend and pattern
    (all queries, and the two-pass last layer's noisy queries only)."""
    B, H, Dh = 1, 2, 8
    pattern = MaskPattern(kind, 8 if kind in ("block_causal", "two_pass") else 0)
    n = 2 * L if kind == "two_pass" else L
    q, k, v = (jax.random.normal(kk, (B, n, H, Dh)) for kk in
               jax.random.split(jax.random.key(0), 3))
    for lq in ((n, L) if kind == "two_pass" else (n,)):
        graph = _dot_flops(lambda q, k, v: attend(q, k, v, pattern, backend=backend),
                           q[:, :lq], k, v)
        assert score_pairs(pattern, lq, n, backend) * 4 * Dh * H * B == graph
    if backend == "xla" and L == 1024 and kind in ("causal", "block_causal"):
        assert score_pairs(pattern, n, n, "xla") < n * n      # tiles above the diagonal skipped


@pytest.mark.parametrize("family,kind", [("ar", "causal"), ("mdlm", "full")])
@pytest.mark.parametrize("backend", ["dense", "xla"])
def test_method_flops_count_their_pattern(family, kind, backend):
    """AR counts causal attention, MDLM bidirectional, each as the backend computes it."""
    exp, _ = _experiment(family)
    L, depth, D = exp.cfg.data.seq_len, 3, 16
    counted = exp.method.flops_per_token(num_params=0, depth=depth, width=D, seq_len=L,
                                         attention=backend)
    np.testing.assert_allclose(counted, attention_flops(
        depth, D, score_pairs(MaskPattern(kind), L, L, backend) / L), rtol=1e-12)


# Exact where no σ conditioning runs (AR, GPT-2); with it, what the count leaves out is the
# per-sequence adaLN of a per-sequence σ (B rows, not B·L) and the missing input gradient of
# the σ embedding's first layer: O(1/L) and O(1/N), ≤ 2.3% at these tiny sizes.
@pytest.mark.parametrize("arg,model,rtol", [
    ("ar", {}, 1e-9),
    ("mdlm", {}, 0.03),
    ("sedd", {}, 0.03),
    ("d3pm", {}, 0.03),
    ("bd3lm,block=8", {}, 0.03),
    ("bd3lm,block=8", {"time_conditioning": True}, 0.03),   # σ per token: adaLN per row
    ("bd3lm,block=8", {"scan_layers": True}, 0.03),         # stacked block parameters
    ("mdlm", {"arch": "gpt2"}, 1e-9),
    ("bd3lm,block=8", {"arch": "gpt2"}, 1e-9),
    ("mdlm", {"ar_weight": 0.5}, 0.03),                      # joint: + a causal pass
    ("bd3lm,block=8", {"ar_weight": 0.5, "time_conditioning": True}, 0.03),
    ("bd3lm,block=8", {"ar_weight": 0.5, "arch": "gpt2"}, 1e-9),
])
def test_experiment_flops_equal_the_training_graph(arg, model, rtol):
    """`Experiment.flops_per_token` × tokens against every dot in the graph of the training
    loss's gradient (dense attention, which computes what it is counted for): gathered tables,
    biases and norm scales are no matmuls, a per-sequence σ's conditioning is no per-token
    matmul, and a two-pass forward runs the output layer and the last block's query-side
    matmuls on the noisy rows only (counted as all 2L rows before: 1.36× the graph for MDLM
    here, 1.66× for BD3-LM)."""
    model = dict(model)
    if "ar_weight" in model:  # joint AR + diffusion training (`registry.apply_adaptation`)
        cfg = registry.apply_adaptation(tiny.get_config(arg), ar_weight=model.pop("ar_weight"))
        exp, net = _experiment(cfg, attention="dense", dropout=0.0, **model)
        assert exp.method.ar_weight == 0.5
    else:
        exp, net = _experiment(arg, attention="dense", dropout=0.0, **model)
    B, L = 4, exp.cfg.data.seq_len
    params = nnx.to_pure_dict(nnx.split(net)[1])
    batch = {"tokens": jax.random.randint(jax.random.key(0), (B, L), 0, exp.token_vocab)}

    def loss(p):
        return exp.method.loss(exp.model(p), batch, jax.random.key(1), train=True)[0]
    graph = _dot_flops(jax.grad(loss), params)
    np.testing.assert_allclose(exp.flops_per_token() * B * L, graph, rtol=rtol)


def test_matmul_params_leave_out_tables_biases_and_per_sequence_conditioning():
    exp, _ = _experiment("bd3lm,block=8")
    params = exp.abstract_params
    depth = registry.model_dims(exp.cfg.model)["depth"]
    size = lambda *path: math.prod(functools.reduce(lambda t, k: t[k], path, params).shape)
    per_block = size("blocks", 0, "attn", "qkv") + size("blocks", 0, "attn", "out") + size(
        "blocks", 0, "mlp", "fc1", "kernel") + size("blocks", 0, "mlp", "fc2", "kernel")
    head = size("final", "linear", "kernel")
    assert len(params["blocks"]) == depth  # the unrolled layout: one subtree per block
    assert registry.matmul_params(params, depth=depth, per_token_sigma=False) == (
        depth * per_block + head,
        head + per_block - size("blocks", 0, "attn", "qkv"), 0)
    conditioning = (depth * size("blocks", 0, "adaln", "kernel") + size("final", "adaln", "kernel")
                    + size("sigma_map", "fc1", "kernel") + size("sigma_map", "fc2", "kernel"))
    assert registry.matmul_params(params, depth=depth, per_token_sigma=True) == (
        depth * per_block + head + conditioning,
        head + size("final", "adaln", "kernel") + per_block - size("blocks", 0, "attn", "qkv"),
        conditioning)
