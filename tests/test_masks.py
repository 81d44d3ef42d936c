"""Attention masks: hand-checked small cases, limits, packing/padding, and a no-leak test."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax import masks


def _np(m):
    return np.asarray(m).astype(int)


def test_causal_and_bidirectional():
    chex.assert_trees_all_equal(_np(masks.causal_mask(4)), np.tril(np.ones((4, 4), int)))
    chex.assert_trees_all_equal(_np(masks.bidirectional_mask(3)), np.ones((3, 3), int))
    assert masks.causal_mask(5).dtype == jnp.bool_


@pytest.mark.parametrize("length", [1, 4, 12])
def test_block_causal_limits(length):
    chex.assert_trees_all_equal(masks.block_causal_mask(length, 1), masks.causal_mask(length))
    chex.assert_trees_all_equal(masks.block_causal_mask(length, length),
                                masks.bidirectional_mask(length))


def test_block_causal_hand_checked():
    expected = np.array([[1, 1, 0, 0],
                         [1, 1, 0, 0],
                         [1, 1, 1, 1],
                         [1, 1, 1, 1]])
    chex.assert_trees_all_equal(_np(masks.block_causal_mask(4, 2)), expected)


def test_two_pass_hand_checked():
    # rows/cols 0..3 = x_t (blocks 0,0,1,1); 4..7 = x_0 (blocks 0,0,1,1)
    expected = np.array([
        # x_t:  b0    b1 | x_0: b0    b1
        [1, 1, 0, 0, 0, 0, 0, 0],  # x_t block 0: own x_t block, no clean block
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],  # x_t block 1: own x_t block + clean block 0
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],  # x_0 block 0: clean block 0
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],  # x_0 block 1: clean blocks 0, 1
        [0, 0, 0, 0, 1, 1, 1, 1],
    ])
    chex.assert_trees_all_equal(_np(masks.bd3lm_two_pass_mask(4, 2)), expected)


@pytest.mark.parametrize("length,block", [(8, 1), (8, 4), (8, 8), (12, 3)])
def test_two_pass_structure(length, block):
    m = np.asarray(masks.bd3lm_two_pass_mask(length, block))
    chex.assert_shape(m, (2 * length, 2 * length))
    blk = np.arange(length) // block
    chex.assert_trees_all_equal(m[:length, :length], blk[:, None] == blk[None, :])
    chex.assert_trees_all_equal(m[:length, length:], blk[:, None] > blk[None, :])
    chex.assert_trees_all_equal(m[length:, length:],
                                np.asarray(masks.block_causal_mask(length, block)))
    assert not m[length:, :length].any()
    assert m.any(-1).all()  # no empty row


def test_block_size_must_divide():
    for fn in (masks.block_causal_mask, masks.bd3lm_two_pass_mask):
        with pytest.raises(ValueError, match=r"block_size=3.*L=8"):
            fn(8, 3)
    with pytest.raises(ValueError):
        masks.block_causal_mask(8, 0)


def test_masks_jit():
    f = jax.jit(functools.partial(masks.bd3lm_two_pass_mask, 8, 2))
    chex.assert_trees_all_equal(f(), masks.bd3lm_two_pass_mask(8, 2))


def test_segment_mask_packed_and_padding():
    seg = jnp.array([[1, 1, 2, 2, 2, 0],
                     [3, 3, 3, 3, 0, 0]])
    m = masks.segment_mask(seg)
    chex.assert_shape(m, (2, 6, 6))
    expected0 = np.array([[1, 1, 0, 0, 0, 0],
                          [1, 1, 0, 0, 0, 0],
                          [0, 0, 1, 1, 1, 0],
                          [0, 0, 1, 1, 1, 0],
                          [0, 0, 1, 1, 1, 0],
                          [0, 0, 0, 0, 0, 1]])  # padding attends to itself only
    chex.assert_trees_all_equal(_np(m[0]), expected0)
    expected1 = np.zeros((6, 6), int)
    expected1[:4, :4] = 1
    expected1[4, 4] = expected1[5, 5] = 1
    chex.assert_trees_all_equal(_np(m[1]), expected1)
    # Combined with a causal mask no row is empty.
    assert np.asarray(masks.combine(masks.causal_mask(6), m)).any(-1).all()


def test_segment_mask_cross_lengths():
    seg_q = jnp.array([[1, 0, 0]])
    seg_k = jnp.array([[1, 1]])
    m = np.asarray(masks.segment_mask(seg_q, seg_k))
    chex.assert_shape(m, (1, 3, 2))
    chex.assert_trees_all_equal(m[0].astype(int), np.array([[1, 1], [0, 1], [0, 1]]))
    assert m.any(-1).all()


def test_padding_mask():
    valid = jnp.array([[True, True, False]])
    m = masks.padding_mask(valid)
    chex.assert_trees_all_equal(_np(m[0]), np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]]))
    chex.assert_trees_all_equal(m, masks.segment_mask(valid.astype(jnp.int32)))


def test_combine_broadcasts():
    c = masks.causal_mask(4)
    seg = jnp.array([[1, 1, 2, 2], [1, 1, 1, 1]])
    out = masks.combine(c, masks.segment_mask(seg))
    chex.assert_shape(out, (2, 4, 4))
    chex.assert_trees_all_equal(out[1], c)
    chex.assert_trees_all_equal(_np(out[0]), np.array([[1, 0, 0, 0], [1, 1, 0, 0],
                                                       [0, 0, 1, 0], [0, 0, 1, 1]]))
    with pytest.raises(ValueError):
        masks.combine()


# --- no-leak test ------------------------------------------------------------------------------
def _toy_layers(key, width, num_layers):
    keys = jax.random.split(key, 4 * num_layers)
    return [tuple(jax.random.normal(keys[4 * i + j], (width, width)) / np.sqrt(width)
                  for j in range(4)) for i in range(num_layers)]


def _toy_model(h, mask, layers):
    """Stack of single-head attention layers (residual + tanh MLP); h: (2L, D)."""
    for wq, wk, wv, wo in layers:
        scores = (h @ wq) @ (h @ wk).T / np.sqrt(h.shape[-1])
        scores = jnp.where(mask, scores, -jnp.inf)  # masked entries get exactly zero weight
        h = h + jax.nn.softmax(scores, axis=-1) @ (h @ wv)
        h = h + jnp.tanh(h @ wo)
    return h


def test_two_pass_no_leak():
    length, block, width = 8, 2, 8
    mask = masks.bd3lm_two_pass_mask(length, block)
    layers = _toy_layers(jax.random.key(0), width, num_layers=2)
    emb = jax.random.normal(jax.random.key(1), (2 * length, width))  # [x_t ⊕ x_0] embeddings
    jac = jax.jit(jax.jacfwd(lambda e: _toy_model(e, mask, layers)))(emb)  # (2L, D, 2L, D)
    dep = np.abs(np.asarray(jac)).sum(axis=(1, 3))  # (2L out, 2L in)

    blk = np.arange(length) // block
    for q in range(length):  # outputs at x_t positions
        b = blk[q]
        on_xt = dep[q, :length]
        on_x0 = dep[q, length:]
        assert (on_xt[blk != b] == 0).all(), "x_t output depends on another noisy block"
        assert (on_x0[blk >= b] == 0).all(), "x_t output sees its own or a later clean block"
        assert (on_xt[blk == b] > 1e-6).all()
        assert (on_x0[blk < b] > 1e-6).all()
    # clean stream: never depends on x_t, and on clean blocks <= its own
    for q in range(length):
        b = blk[q]
        assert (dep[length + q, :length] == 0).all()
        assert (dep[length + q, length:][blk > b] == 0).all()
        assert (dep[length + q, length:][blk <= b] > 1e-6).all()
