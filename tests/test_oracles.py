"""`dlm_jax.oracles` against independent brute-force loops on tiny sequence spaces.

The references below never call the oracles: they loop over every clean and noisy sequence in
Python, with per-token kernels from `scipy.linalg.expm` (continuous time) or from explicit matrix
products (`D3PM.q_bar_by_product`, discrete time), and apply Bayes' rule entry by entry.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import expm

from dlm_jax import oracles
from dlm_jax.processes.d3pm import D3PM
from dlm_jax.processes.transitions import Absorbing, MatrixProcess, Uniform

Q3 = np.array([[-1.0, 0.7, 0.3], [0.2, -0.5, 0.3], [0.9, 0.6, -1.5]])
PROCESSES = {"uniform": Uniform(3), "absorbing": Absorbing(2), "matrix": MatrixProcess(Q3)}


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _kernel(process, noise) -> np.ndarray:
    """Per-token q(x_t = j | x_0 = i), (S, S), computed independently of the process's closed
    forms: scipy's expm of σ̄Q, or D3PM's explicit product Q_1 ⋯ Q_t."""
    if isinstance(process, D3PM):
        return np.asarray(process.q_bar_by_product())[int(noise)]
    return expm(float(noise) * np.asarray(process.rate_matrix()))


def _brute(joint: np.ndarray, process, noise):
    """(p_t (S,)*L, posterior marginals (S^L, L, S)) by explicit loops over x0 and x."""
    kernel = _kernel(process, noise)
    s, length, v = process.num_states, joint.ndim, joint.shape[0]
    xs = list(itertools.product(range(s), repeat=length))
    pt = np.zeros((s,) * length)
    post = np.zeros((len(xs), length, s))
    for n, x in enumerate(xs):
        for x0 in itertools.product(range(v), repeat=length):
            w = joint[x0] * np.prod([kernel[x0[d], x[d]] for d in range(length)])
            pt[x] += w
            for d in range(length):
                post[n, d, x0[d]] += w
        if pt[x] > 0:
            post[n] /= pt[x]
    return pt, post


def _random_table(seed, v, length, zero_first=False):
    joint = np.random.default_rng(seed).dirichlet(np.ones(v ** length)).reshape((v,) * length)
    if zero_first:  # one impossible clean sequence, so that some noisy sequences are impossible
        joint.reshape(-1)[0] = 0.0
        joint /= joint.sum()
    return joint


def test_all_sequences_order_and_limit():
    for s, length in [(2, 3), (3, 2), (1, 4), (4, 1)]:
        seqs = oracles.all_sequences(s, length)
        assert seqs.dtype == jnp.int32 and seqs.shape == (s ** length, length)
        np.testing.assert_array_equal(seqs, list(itertools.product(range(s), repeat=length)))
    with pytest.raises(ValueError, match=r"S=3 states, L=9 positions\) exceeds max_count=4096"):
        oracles.all_sequences(3, 9)
    with pytest.raises(ValueError, match="max_count=8"):
        oracles.all_sequences(3, 2, max_count=8)
    assert oracles.all_sequences(3, 2, max_count=9).shape == (9, 2)
    with pytest.raises(ValueError, match="L >= 1"):
        oracles.all_sequences(3, 0)


def test_sequence_index_and_hamming_neighbors():
    s, length = 3, 3
    seqs = oracles.all_sequences(s, length)
    np.testing.assert_array_equal(oracles.sequence_index(seqs, s), np.arange(s ** length))
    x = jnp.asarray([[0, 2, 1], [1, 1, 0]], jnp.int32)
    nb = np.asarray(oracles.hamming_neighbors(x, s))
    assert nb.shape == (2, length, s, length)
    for b in range(2):
        for i in range(length):
            for y in range(s):
                want = np.asarray(x[b]).copy()
                want[i] = y
                np.testing.assert_array_equal(nb[b, i, y], want)
    with pytest.raises(ValueError, match="integer tokens"):
        oracles.hamming_neighbors(jnp.zeros((2, 3)), s)
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        oracles.hamming_neighbors(jnp.zeros((3,), jnp.int32), s)


@pytest.mark.parametrize("name", list(PROCESSES))
def test_transition_table_is_the_product_of_per_token_kernels(name):
    process, length, sigma_bar = PROCESSES[name], 2, 0.7
    s = process.num_states
    kernel = _kernel(process, sigma_bar)
    x0 = oracles.all_sequences(s, length)
    table = np.asarray(oracles.transition_table(process, x0, sigma_bar))
    assert table.shape == (s ** length, s ** length)
    for a, z0 in enumerate(itertools.product(range(s), repeat=length)):
        for n, x in enumerate(itertools.product(range(s), repeat=length)):
            want = np.prod([kernel[z0[d], x[d]] for d in range(length)])
            np.testing.assert_allclose(table[a, n], want, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(table.sum(-1), 1.0, atol=1e-12)
    # One noise level per clean sequence equals separate calls.
    noise = jnp.asarray([0.2, 1.5])
    per_row = oracles.transition_table(process, x0[:2], noise)
    for b in range(2):
        np.testing.assert_allclose(per_row[b], oracles.transition_table(process, x0[b:b + 1],
                                                                        noise[b])[0], atol=1e-14)


@pytest.mark.parametrize("name", list(PROCESSES))
def test_marginal_and_posterior_match_bayes_rule(name):
    process, length, sigma_bar = PROCESSES[name], 2, 0.9
    s = process.num_states
    v = s - 1 if name == "absorbing" else s  # absorbing: data on the real tokens only
    joint = _random_table(1, v, length, zero_first=True)
    pt, post = _brute(joint, process, sigma_bar)
    xt = oracles.all_sequences(s, length)
    np.testing.assert_allclose(oracles.exact_marginal(jnp.asarray(joint), process, sigma_bar), pt,
                               rtol=1e-10, atol=1e-14)
    got = np.asarray(oracles.exact_x0_posterior(jnp.asarray(joint), process, xt, sigma_bar))
    assert got.shape == (s ** length, length, s)
    np.testing.assert_allclose(got, post, rtol=1e-10, atol=1e-13)
    possible = pt.reshape(-1) > 0
    np.testing.assert_allclose(got[possible].sum(-1), 1.0, atol=1e-12)
    if name == "absorbing":  # x_t = (0, 0) only comes from x0 = (0, 0), which has p0 = 0
        assert not possible[0] and np.all(got[0] == 0) and np.all(got[..., process.mask_id] == 0)
    # One noise level per row equals the scalar calls.
    noise = jnp.asarray([0.3, 2.0, 0.9])
    per_row = oracles.exact_x0_posterior(jnp.asarray(joint), process, xt[:3], noise)
    for n in range(3):
        np.testing.assert_allclose(per_row[n], _brute(joint, process, float(noise[n]))[1][n],
                                   rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", list(PROCESSES))
def test_log_ratios_match_brute_force(name):
    process, length, sigma_bar = PROCESSES[name], 2, 0.6
    s = process.num_states
    v = s - 1 if name == "absorbing" else s
    joint = _random_table(2, v, length)
    pt, _ = _brute(joint, process, sigma_bar)
    xt = oracles.all_sequences(s, length)
    got = np.asarray(oracles.exact_log_ratios(jnp.asarray(joint), process, xt, sigma_bar))
    assert got.shape == (s ** length, length, s)
    for n, x in enumerate(itertools.product(range(s), repeat=length)):
        for d in range(length):
            for y in range(s):
                nb = list(x)
                nb[d] = y
                want = 0.0 if y == x[d] else np.log(pt[tuple(nb)] / pt[x])
                np.testing.assert_allclose(got[n, d, y], want, rtol=1e-10, atol=1e-12)
    noise = jnp.asarray([0.6, 1.7])
    per_row = np.asarray(oracles.exact_log_ratios(jnp.asarray(joint), process, xt[:2], noise))
    np.testing.assert_allclose(per_row[0], got[0], atol=1e-12)
    np.testing.assert_allclose(
        per_row[1], oracles.exact_log_ratios(jnp.asarray(joint), process, xt[1:2], 1.7)[0],
        atol=1e-12)


@pytest.mark.parametrize("kind", ["uniform", "absorbing"])
def test_d3pm_posterior_matches_bayes_rule(kind):
    process = D3PM(kind, 2, 4, "linear", beta_min=0.1, beta_max=0.6)
    s, length = process.num_states, 2
    joint = _random_table(3, process.vocab_size, length)
    xt = oracles.all_sequences(s, length)
    for t in (1, 3):
        pt, post = _brute(joint, process, t)
        np.testing.assert_allclose(oracles.exact_marginal(jnp.asarray(joint), process, t), pt,
                                   rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(oracles.exact_x0_posterior(jnp.asarray(joint), process, xt, t),
                                   post, rtol=1e-10, atol=1e-13)
    steps = jnp.asarray([1, 3, 4])
    per_row = oracles.exact_x0_posterior(jnp.asarray(joint), process, xt[:3], steps)
    for n in range(3):
        np.testing.assert_allclose(per_row[n], _brute(joint, process, int(steps[n]))[1][n],
                                   rtol=1e-10, atol=1e-13)


def test_random_joint_and_argument_checks():
    p = oracles.random_joint(4, 3, 2, excluded_state=2)
    assert p.shape == (3, 3) and p.dtype == np.float64
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-12)
    assert np.all(p[2, :] == 0) and np.all(p[:, 2] == 0) and np.all(p[:2, :2] > 0)
    np.testing.assert_array_equal(p, oracles.random_joint(4, 3, 2, excluded_state=2))
    assert np.all(oracles.random_joint(4, 3, 2) > 0)
    proc = Uniform(3)
    xt = jnp.zeros((2, 2), jnp.int32)
    with pytest.raises(ValueError, match=r"\(V,\)\*L"):
        oracles.exact_x0_posterior(jnp.ones((3, 2)), proc, xt, 0.5)
    with pytest.raises(ValueError, match="V=4"):
        oracles.exact_marginal(jnp.ones((4, 4)) / 16, proc, 0.5)
    with pytest.raises(ValueError, match="L=2 positions"):
        oracles.exact_log_ratios(jnp.ones((3,)) / 3, proc, xt, 0.5)
    with pytest.raises(ValueError, match=r"one value per row, \(2,\)"):
        oracles.exact_x0_posterior(jnp.ones((3, 3)) / 9, proc, xt, jnp.ones(3))
    with pytest.raises(ValueError, match="scalar noise"):
        oracles.exact_marginal(jnp.ones((3, 3)) / 9, proc, jnp.ones(2))
