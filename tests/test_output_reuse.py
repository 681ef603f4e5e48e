"""Layers write a new output into the memory of their last one only when nobody holds it."""

import numpy as np
import pytest

import streamnorm as sn


def _addr(a):
    return a.__array_interface__["data"][0]


def _warm_up(make, shape):
    """Compile the layer's kernels first: while numba compiles, its frames can keep the
    arguments (an output among them) alive until the next garbage collection, so the
    first call's output would not be free for reuse yet."""
    layer = make()
    x = np.ones(shape)
    layer(x)
    layer.backward(x)


LAYERS = [
    (lambda: sn.BatchNorm(8), (64, 8)),
    (lambda: sn.BatchNorm2d(4), (6, 4, 5, 5)),
    (lambda: sn.LayerNorm(16), (10, 16)),
    (lambda: sn.RMSNorm(16), (10, 16)),
    (lambda: sn.GroupNorm(2, 4), (6, 4, 5)),
    (lambda: sn.InstanceNorm(4), (6, 4, 5)),
    # eval mode: the state stays put, so a twin layer gives the same values call after call
    (lambda: sn.OnlineNorm(4).eval(), (6, 4, 5)),
    (lambda: sn.OnlineNorm(4, ecm="ls").eval(), (6, 4)),
]


@pytest.mark.parametrize("make, shape", LAYERS)
def test_dropped_output_is_reused_and_held_output_is_not(rng, make, shape):
    _warm_up(make, shape)
    layer = make()
    x1, x2, x3 = (rng.normal(size=shape) for _ in range(3))
    y1 = layer(x1)
    a1 = _addr(y1)
    del y1
    y2 = layer(x2)
    assert _addr(y2) == a1  # nobody held y1: its memory came back
    np.testing.assert_array_equal(y2, make()(x2))  # and the values are those of a fresh layer
    view = y2[1:3]
    keep = view.copy()
    del y2
    y3 = layer(x3)  # a view of y2 is alive: y2's memory is not touched
    assert _addr(y3) != a1
    np.testing.assert_array_equal(view, keep)
    np.testing.assert_array_equal(y3, make()(x3))


@pytest.mark.parametrize("make, shape", LAYERS)
def test_dropped_gradient_is_reused_and_held_gradient_is_not(rng, make, shape):
    _warm_up(make, shape)
    layer, ref = make(), make()
    x = rng.normal(size=shape)
    layer(x)
    ref(x)
    dy1, dy2, dy3 = (rng.normal(size=shape) for _ in range(3))
    g1 = layer.backward(dy1)
    a1 = _addr(g1)
    del g1
    g2 = layer.backward(dy2)
    assert _addr(g2) == a1
    np.testing.assert_array_equal(g2, ref.backward(dy2))
    g3 = layer.backward(dy3)  # g2 is held: a new array
    assert _addr(g3) != a1
    np.testing.assert_array_equal(g2, ref.backward(dy2))
    np.testing.assert_array_equal(g3, ref.backward(dy3))


@pytest.mark.parametrize("make, shape", LAYERS)
def test_the_usual_loop_reuses_the_output_before_last(rng, make, shape):
    _warm_up(make, shape)
    layer, ref = make(), make()
    xs = [rng.normal(size=shape) for _ in range(5)]
    addrs = []
    h = None
    for x in xs:
        h = layer(x)  # the previous h is still bound while the layer runs
        addrs.append(_addr(h))
        np.testing.assert_array_equal(h, ref(x))
    assert addrs[2] == addrs[0] and addrs[3] == addrs[1] and addrs[0] != addrs[1]


@pytest.mark.parametrize("shape", [(6, 4), (6, 4, 5)])
@pytest.mark.parametrize("ecm", [None, "ac", "ls"])
def test_online_norm_train_mode_reuses_and_matches_a_layer_that_does_not(rng, shape, ecm):
    _warm_up(lambda: sn.OnlineNorm(4, ecm=ecm), shape)
    layer = sn.OnlineNorm(4, alpha_fwd=0.8, alpha_bkw=0.7, ecm=ecm)
    ref = sn.OnlineNorm(4, alpha_fwd=0.8, alpha_bkw=0.7, ecm=ecm)
    ref.reuse_output = False
    addrs, gaddrs = [], []
    for _ in range(4):
        x, dy = rng.normal(size=shape) * 3, rng.normal(size=shape)
        y = layer(x)
        np.testing.assert_array_equal(y, ref(x))
        addrs.append(_addr(y))
        del y
        g = layer.backward(dy)
        np.testing.assert_array_equal(g, ref.backward(dy))
        gaddrs.append(_addr(g))
        del g
        for k in ("mu", "var", "u", "v"):
            np.testing.assert_array_equal(layer.buffers[k], ref.buffers[k])
    assert len(set(addrs)) == 1 and len(set(gaddrs)) == 1


def test_output_fed_back_as_input_is_not_overwritten(rng):
    ln = sn.LayerNorm(16)
    y = ln(rng.normal(size=(10, 16)))
    ref = sn.LayerNorm(16)(y.copy())
    np.testing.assert_array_equal(ln(y), ref)


def test_reuse_can_be_switched_off(rng):
    ln = sn.LayerNorm(16)
    ln.reuse_output = False
    ln(rng.normal(size=(10, 16)))
    assert not ln._spare


def test_state_changes_nothing_for_other_shapes_or_dtypes(rng):
    bn = sn.BatchNorm(8)
    y = bn(rng.normal(size=(64, 8)))
    a = _addr(y)
    del y
    y32 = bn(rng.normal(size=(64, 8)).astype(np.float32))
    assert y32.dtype == np.float32 and _addr(y32) != a
