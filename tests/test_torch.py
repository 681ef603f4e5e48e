"""Forward, running statistics and gradients against PyTorch on CPU (skipped without torch)."""

from __future__ import annotations

import numpy as np
import pytest

import streamnorm as sn

torch = pytest.importorskip("torch")


def t64(a, grad=False):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad)


@pytest.mark.parametrize("shape", [(16, 4), (5, 4, 7), (3, 4, 5, 6), (2, 4, 3, 3, 2)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_train_matches_torch(rng, shape, momentum):
    C = shape[1]
    tbn = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[
        len(shape)
    ](C, momentum=momentum).double()
    with torch.no_grad():
        tbn.weight.copy_(t64(rng.standard_normal(C)))
        tbn.bias.copy_(t64(rng.standard_normal(C)))
    bn = sn.BatchNorm(C, momentum=momentum)
    bn.load_state_dict({k: v.detach().numpy() for k, v in tbn.state_dict().items()})
    for step in range(3):
        x = rng.standard_normal(shape) * (step + 1) + step
        dy = rng.standard_normal(shape)
        xt = t64(x, grad=True)
        yt = tbn(xt)
        yt.backward(t64(dy))
        y = bn(x)
        dx = bn.backward(dy)
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(bn.grads["weight"], tbn.weight.grad.numpy(), rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(bn.grads["bias"], tbn.bias.grad.numpy(), rtol=1e-9, atol=1e-10)
        tbn.weight.grad = tbn.bias.grad = None
    for k, v in tbn.state_dict().items():
        np.testing.assert_allclose(bn.state_dict()[k], v.numpy(), rtol=1e-12)


def test_batchnorm_eval_and_float32_match_torch(rng):
    C = 5
    tbn = torch.nn.BatchNorm2d(C)
    for _ in range(2):
        tbn(torch.tensor(rng.standard_normal((4, C, 3, 3)), dtype=torch.float32) * 2 + 1)
    tbn.eval()
    bn = sn.BatchNorm2d(C)
    bn.load_state_dict({k: v.numpy() for k, v in tbn.state_dict().items()})
    bn.eval()
    x = rng.standard_normal((3, C, 4, 4)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    yt = tbn(xt)
    yt.backward(torch.tensor(dy))
    y = bn(x)
    dx = bn.backward(dy)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.grads["weight"], tbn.weight.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bn.grads["bias"], tbn.bias.grad.numpy(), rtol=1e-4, atol=1e-4)
    # and the state dict goes back into torch as it is
    tbn2 = torch.nn.BatchNorm2d(C)
    tbn2.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in bn.state_dict().items()})


def test_channels_last_matches_torch_on_permuted_input(rng):
    x = rng.standard_normal((3, 4, 5, 6))
    dy = rng.standard_normal(x.shape)
    bn = sn.BatchNorm(6, axis=-1)
    tbn = torch.nn.BatchNorm2d(6).double()
    xt = t64(x, grad=True)
    yt = tbn(xt.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    yt.backward(t64(dy))
    np.testing.assert_allclose(bn(x), yt.detach().numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(bn.backward(dy), xt.grad.numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(bn.running_var, tbn.running_var.numpy(), rtol=1e-12)


@pytest.mark.parametrize("shape,ns", [((7, 16), (16,)), ((2, 3, 4, 5), (4, 5)), ((3, 1000), (1000,))])
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_layernorm_matches_torch(rng, shape, ns, affine, bias):
    tln = torch.nn.LayerNorm(ns, elementwise_affine=affine, bias=bias).double()
    ln = sn.LayerNorm(ns, elementwise_affine=affine, bias=bias)
    if affine:
        with torch.no_grad():
            tln.weight.copy_(t64(rng.standard_normal(ns)))
            if bias:
                tln.bias.copy_(t64(rng.standard_normal(ns)))
    ln.load_state_dict({k: v.detach().numpy() for k, v in tln.state_dict().items()})
    x = rng.standard_normal(shape) * 3 + 2
    dy = rng.standard_normal(shape)
    xt = t64(x, grad=True)
    yt = tln(xt)
    yt.backward(t64(dy))
    np.testing.assert_allclose(ln(x), yt.detach().numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ln.backward(dy), xt.grad.numpy(), rtol=1e-9, atol=1e-10)
    for name, p in tln.named_parameters():
        np.testing.assert_allclose(ln.grads[name], p.grad.numpy(), rtol=1e-9, atol=1e-10)


def _compare_module(layer, tmod, x, dy, rtol=1e-9):
    tmod.zero_grad()
    xt = t64(x, grad=True)
    yt = tmod(xt)
    yt.backward(t64(dy))
    np.testing.assert_allclose(layer(x), yt.detach().numpy(), rtol=rtol, atol=1e-10)
    np.testing.assert_allclose(layer.backward(dy), xt.grad.numpy(), rtol=rtol, atol=1e-10)
    for name, p in tmod.named_parameters():
        np.testing.assert_allclose(layer.grads[name], p.grad.numpy(), rtol=rtol, atol=1e-10)


@pytest.mark.parametrize("shape,G", [((4, 6, 5), 3), ((2, 8, 3, 4), 4), ((3, 6), 2), ((2, 4, 2, 3, 2), 1)])
def test_groupnorm_matches_torch(rng, shape, G):
    C = shape[1]
    tg = torch.nn.GroupNorm(G, C).double()
    with torch.no_grad():
        tg.weight.copy_(t64(rng.standard_normal(C)))
        tg.bias.copy_(t64(rng.standard_normal(C)))
    gn = sn.GroupNorm(G, C)
    gn.load_state_dict({k: v.detach().numpy() for k, v in tg.state_dict().items()})
    _compare_module(gn, tg, rng.standard_normal(shape) * 2 + 1, rng.standard_normal(shape))


@pytest.mark.parametrize("shape", [(4, 3, 7), (2, 3, 4, 5)])
@pytest.mark.parametrize("affine,track", [(False, False), (True, True)])
def test_instancenorm_matches_torch(rng, shape, affine, track):
    C = shape[1]
    cls = torch.nn.InstanceNorm1d if len(shape) == 3 else torch.nn.InstanceNorm2d
    tin = cls(C, affine=affine, track_running_stats=track, momentum=0.3).double()
    inn = sn.InstanceNorm(C, affine=affine, track_running_stats=track, momentum=0.3)
    if affine:
        with torch.no_grad():
            tin.weight.copy_(t64(rng.standard_normal(C)))
            tin.bias.copy_(t64(rng.standard_normal(C)))
    inn.load_state_dict({k: v.detach().numpy() for k, v in tin.state_dict().items()})
    for _ in range(2):
        _compare_module(inn, tin, rng.standard_normal(shape) * 3 + 1, rng.standard_normal(shape))
    for k, v in tin.state_dict().items():
        np.testing.assert_allclose(inn.state_dict()[k], v.detach().numpy(), rtol=1e-12)
    if track:
        tin.eval()
        inn.eval()
        _compare_module(inn, tin, rng.standard_normal(shape), rng.standard_normal(shape))


@pytest.mark.parametrize("shape,ns", [((5, 16), (16,)), ((2, 3, 4, 5), (4, 5))])
@pytest.mark.parametrize("eps", [None, 1e-6])
def test_rmsnorm_matches_torch(rng, shape, ns, eps):
    tr = torch.nn.RMSNorm(ns, eps=eps).double()
    with torch.no_grad():
        tr.weight.copy_(t64(rng.standard_normal(ns)))
    rn = sn.RMSNorm(ns, eps=eps)
    rn.load_state_dict({k: v.detach().numpy() for k, v in tr.state_dict().items()})
    _compare_module(rn, tr, rng.standard_normal(shape) * 2, rng.standard_normal(shape))


def test_rmsnorm_float32_default_eps_matches_torch(rng):
    x = rng.standard_normal((4, 32)).astype(np.float32) * 1e-3
    tr = torch.nn.RMSNorm(32)
    rn = sn.RMSNorm(32)
    np.testing.assert_allclose(rn(x), tr(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-6)
