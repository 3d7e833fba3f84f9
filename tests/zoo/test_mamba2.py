"""Mamba-2: causality, decode == forward, packing, gradients, and the SSD recurrence itself."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

import zoo
from tests.zoo.test_recurrent import (
  TOL,
  Compiled,
  check_causal,
  check_constant_state,
  check_decode,
  check_gradients,
  check_packed,
  tokens,
  train_mqar,
)
from zoo.mamba2.model import Mamba2Mixer


def cfg(**kw):
  small = dict(d_model=32, n_layers=2, d_state=8, head_dim=16, chunk_size=8)
  return zoo.config("mamba2", "tiny", **{**small, **kw})


@pytest.fixture(scope="module")
def mamba():
  return Compiled(zoo.build(cfg(), rngs=0))


def test_causal(mamba):
  check_causal(mamba, tokens(0, 2, 20))


def test_decode_matches_forward(mamba):
  check_decode(mamba, tokens(1, 2, 20))


def test_packed_documents_do_not_interact(mamba):
  check_packed(mamba, tokens(2, 2, 20))


def test_decode_state_is_constant_size(mamba):
  check_constant_state(mamba.model)
  assert mamba.model.state_size() == 2 * 4 * 8 * 16  # layers * H * N * P


def test_mixer_is_the_ssd_recurrence():
  # h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T, y_t = C_t^T h_t + D x_t, written out by hand
  # (no convolution, so B, C, x are plain projections).
  c = cfg(conv_width=0)
  mixer = Mamba2Mixer(c, rngs=nnx.Rngs(3))
  x = jax.random.normal(jax.random.key(4), (1, 9, 32))
  got, _ = nnx.jit(lambda m, x: m(x))(mixer, x)
  names = ("w_x", "w_z", "w_b", "w_c", "w_dt", "a_log", "dt_bias", "d_skip", "w_out")
  p = {n: np.asarray(getattr(mixer, n)[...], np.float64) for n in names}
  x64 = np.asarray(x[0], np.float64)
  xs = np.einsum("td,dhp->thp", x64, p["w_x"])
  b, cc = x64 @ p["w_b"], x64 @ p["w_c"]
  dt = np.log1p(np.exp(x64 @ p["w_dt"] + p["dt_bias"]))
  a = -np.exp(p["a_log"])
  h = np.zeros((4, 8, 16))
  ys = []
  for t in range(9):
    h = np.exp(dt[t] * a)[:, None, None] * h + np.einsum("n,hp->hnp", b[t], dt[t][:, None] * xs[t])
    ys.append(np.einsum("n,hnp->hp", cc[t], h) + p["d_skip"][:, None] * xs[t])
  y = np.stack(ys)
  z = np.einsum("td,dhp->thp", x64, p["w_z"])
  y = (y * z / (1 + np.exp(-z))).reshape(9, 64)
  y = y / np.sqrt(np.mean(y**2, -1, keepdims=True) + c.norm_eps) * np.asarray(mixer.norm.scale[...])
  want = np.einsum("thp,hpd->td", y.reshape(9, 4, 16), p["w_out"])
  np.testing.assert_allclose(got[0], want, atol=TOL["decode"])


def test_gradients_finite_and_nonzero():
  check_gradients(zoo.build(cfg(), rngs=1), tokens(3, 2, 20))


@pytest.mark.slow
def test_mqar_beats_chance():
  # The slowest learner here: dt ~ U(1e-3, 0.1) scales every write, the D skip dominates the
  # read at first and the gate silu(z) adds key-dependent noise. Measured: the 4-layer MLP-free
  # preset 0.121 at 800 steps; 2 layers with a SwiGLU 0.119 at 500 steps here (0.15-0.18 in the
  # MQAR table). So the bar is a binomial one: 4 standard deviations above chance over the
  # 512 scored answers (128 examples x 4), i.e. 0.105 for chance 0.0625.
  result = train_mqar(zoo.config("mamba2", "tiny", n_layers=2, d_ff=128), steps=500)
  p = result["chance"]
  assert result["accuracy"] > p + 4 * math.sqrt(p * (1 - p) / 512), result["accuracy"]
