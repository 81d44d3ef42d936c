"""`MaskPattern` against the dense masks of `dlm_jax.masks` (an independent construction), its
static tile table against the dense mask, and `model_mask`'s causal AND."""
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax import masks
from dlm_jax.models.attention import CAUSAL, FULL, MaskPattern, model_mask

L = 24


def _cases():
    return [
        (FULL, masks.bidirectional_mask(L)),
        (CAUSAL, masks.causal_mask(L)),
        (MaskPattern("block_causal", 4), masks.block_causal_mask(L, 4)),
        (MaskPattern("block_causal", 1), masks.causal_mask(L)),
        (MaskPattern("full", band=5), masks.band_mask(L, 5)),
        (MaskPattern("block_causal", 6, band=2),
         masks.block_causal_mask(L, 6) & masks.band_mask(L, 2)),
        (MaskPattern("two_pass", 4), masks.bd3lm_two_pass_mask(L, 4)),
        (MaskPattern("two_pass", 6, band=1),
         masks.bd3lm_two_pass_mask(L, 6) & jnp.tile(masks.band_mask(L, 1), (2, 2))),
    ]


@pytest.mark.parametrize("case", range(len(_cases())))
def test_pattern_equals_dense_mask(case):
    pattern, want = _cases()[case]
    lq, lk = want.shape
    np.testing.assert_array_equal(pattern.dense(lq, lk), want)
    # queries are the first rows: the two-pass last layer's noisy rows only
    np.testing.assert_array_equal(pattern.dense(lq // 2, lk), want[:lq // 2])


@pytest.mark.parametrize("case", range(len(_cases())))
@pytest.mark.parametrize("tiles", [(4, 4), (5, 7), (16, 8)])
def test_tiles_hold_exactly_the_allowed_entries(case, tiles):
    pattern, want = _cases()[case]
    if pattern.band is not None:  # the table ignores the band: compare with the unbanded mask
        pattern = MaskPattern(pattern.kind, pattern.block_size)
        want = pattern.dense(*want.shape)
    tq, tk = tiles
    got = pattern.tiles(*want.shape, tq, tk)
    w = np.asarray(want)
    for i in range(got.shape[0]):
        for j in range(got.shape[1]):
            assert got[i, j] == w[i * tq:(i + 1) * tq, j * tk:(j + 1) * tk].any()


def test_model_mask_ands_the_causal_mask():
    user = masks.block_causal_mask(L, 4) | masks.causal_mask(L).T   # not a structural mask
    got = model_mask(user, L, causal=True)
    np.testing.assert_array_equal(got[0], user & masks.causal_mask(L))
    assert model_mask(MaskPattern("block_causal", 4), L, causal=True) == CAUSAL
    assert model_mask(None, L, causal=False) == FULL
    with pytest.raises(ValueError, match="two-pass"):
        model_mask(MaskPattern("two_pass", 4), L, causal=True)
    with pytest.raises(ValueError, match="length 24"):
        model_mask(jnp.ones((L, L + 1), bool), L, causal=False)


def test_bad_patterns_are_named():
    with pytest.raises(ValueError, match="kind"):
        MaskPattern("sliding")
    with pytest.raises(ValueError, match="block_size"):
        MaskPattern("block_causal")
    with pytest.raises(ValueError, match="2L keys"):
        MaskPattern("two_pass", 4).dense(10, 10)
