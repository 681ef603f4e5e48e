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
