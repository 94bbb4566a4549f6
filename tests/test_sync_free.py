"""An EP estimate stalls no device: no host sync, a device-side finite flag, one compiled graph."""
import pytest
import torch
from torch.overrides import TorchFunctionMode

from helpers import batch, ep_estimator
from pcn_ep.core import (VGG5, VGG10, Backprop, DivergenceError, MLP, ResNetPCN, VGG10Skip,
                         compile_estimator)

SYNCS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.tolist, torch.Tensor.nonzero,
         torch.nonzero, torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__,
         torch.Tensor.cpu, torch.Tensor.numpy, torch.masked_select, torch.Tensor.masked_select}


class HostSyncs(TorchFunctionMode):
    """Records every call that makes the host wait for the device: value reads, data-dependent
    shapes (``nonzero``, boolean-mask indexing) and copies to another device."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCS:
            self.calls.append(func.__name__)
        elif func is torch.Tensor.__getitem__ and _has_mask(args[1]):
            self.calls.append("boolean-mask indexing")
        elif func in (torch.Tensor.to, torch.Tensor.cuda) and _moves_device(args, kwargs):
            self.calls.append("device copy")
        return func(*args, **kwargs)


def _has_mask(index):
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _moves_device(args, kwargs):
    target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))),
                                       None))
    return target is not None and torch.device(target) != args[0].device


NETS = {
    "vgg5": (lambda: VGG5(3, 10, 16, width_mult=0.125), (4, 3, 16, 16)),
    "vgg10": (lambda: VGG10(3, 10, input_size=32, width_mult=0.0625, fc_width=64), (4, 3, 32, 32)),
    "vgg10skip": (lambda: VGG10Skip(3, 10, input_size=32, width_mult=0.0625, fc_width=64),
                  (4, 3, 32, 32)),
    # generic layers (torch.func VJPs) with BatchNorm: each nudged copy apart, no running update
    "resnet": (lambda: ResNetPCN(3, 10, 8, width_mult=1 / 16, blocks=(1, 1)), (4, 3, 8, 8)),
}


def _setup(name):
    make, shape = NETS[name]
    torch.manual_seed(0)
    return make(), *batch(shape, 10, dtype=torch.float32)


@pytest.mark.parametrize("scheme", ["centered", "random", "forward"])
@pytest.mark.parametrize("name", sorted(NETS))
def test_ep_estimate_makes_no_host_sync(name, scheme):
    net, x, y = _setup(name)
    ep = ep_estimator(scheme=scheme, beta=0.05, K=4, check_finite=False,
                      generator=torch.Generator().manual_seed(0))
    with HostSyncs() as syncs:
        estimate = ep(net, x, y)
        estimate.surrogate.backward()
    assert syncs.calls == []
    assert estimate.finite.dim() == 0 and estimate.finite.dtype == torch.bool
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in estimate.stats.values())
    with HostSyncs() as syncs:  # the guarded default: exactly one sync, the finite check
        ep_estimator(scheme=scheme, beta=0.05, K=4)(net, x, y)
    assert syncs.calls == ["__bool__"]


def test_backprop_estimate_makes_no_host_sync():
    net, x, y = _setup("vgg5")
    with HostSyncs() as syncs:
        estimate = Backprop(check_finite=False)(net, x, y)
    assert syncs.calls == [] and bool(estimate.finite)


def test_the_counter_sees_what_it_must():
    t = torch.ones(3)
    with HostSyncs() as syncs:
        t.sum().item(), bool(t.sum()), t[t > 0], t.nonzero(), float(t[0])
    assert syncs.calls == ["item", "__bool__", "boolean-mask indexing", "nonzero", "__float__"]


def test_statistics_name_each_sign_and_the_free_cost():
    net, x, y = _setup("vgg5")
    stats = ep_estimator(beta=0.05, K=4)(net, x, y).stats
    assert {"E+", "E-", "C+", "C-", "energy+", "energy-", "E_max", "C_free"} == stats.keys()
    torch.testing.assert_close(stats["energy+"], stats["E+"] + 0.05 * stats["C+"])
    assert 0 < stats["E+"] <= stats["E_max"] < 0.05 * stats["C_free"]
    assert ep_estimator(scheme="forward", beta=0.05, K=4)(net, x, y).stats.keys() == {
        "E+", "C+", "energy+", "E_max", "C_free"}


def test_finite_flag_and_the_message_on_the_same_batch():
    torch.manual_seed(0)
    net = MLP(6, 3, hidden=(16, 16))
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    assert bool(ep_estimator("mse", beta=0.05, K=4, check_finite=False)(net, x, y).finite)
    blown = ep_estimator("mse", beta=1e30, K=4, check_finite=False)(net, x, y)
    assert not bool(blown.finite)
    with pytest.raises(DivergenceError, match=r"gradient \(layers\.\d\.weight\) in layer \d after"):
        ep_estimator("mse", beta=1e30, K=4)(net, x, y)
    nan = x.clone()
    nan[0, 0] = float("nan")
    assert not bool(ep_estimator(beta=0.05, K=4, check_finite=False)(net, nan, y).finite)
    assert not bool(Backprop(check_finite=False)(net, nan, y).finite)
    with pytest.raises(DivergenceError, match="non-finite loss"):
        ep_estimator(beta=0.05, K=4)(net, nan, y)


@pytest.mark.parametrize("scheme, rule, order", [("centered", "mod-pgd", "async"),
                                                 ("random", "mod-pgd", "async"),
                                                 ("centered", "pgd", "sync")])
@pytest.mark.parametrize("name", sorted(NETS))
def test_estimate_compiles_whole(name, scheme, rule, order):
    """``fullgraph=True`` fails on any graph break; the eager backend keeps the test fast (graph
    breaks are found while tracing, before any backend runs). K = 4 reaches the lower layers'
    fixed-input path and the upper layers' refreshed one."""
    torch._dynamo.reset()
    net, x, y = _setup(name)
    ep = ep_estimator(scheme=scheme, beta=0.05, K=4, rule=rule, order=order,
                      check_finite=False, generator=torch.Generator().manual_seed(0))
    got = compiled_equals_eager(ep, net, x, y)
    assert bool(got.finite)


def compiled_equals_eager(ep, net, x, y):
    """The whole-graph compiled estimate (``fullgraph=True``) gives eager's gradients on the same
    signs; returns the compiled estimate."""
    got = compile_estimator(ep, backend="eager")(net, x, y)
    want = ep.estimate(net, x, y, got.betas)
    params = list(net.parameters())
    for a, b in zip(torch.autograd.grad(got.surrogate, params),
                    torch.autograd.grad(want.surrogate, params)):
        torch.testing.assert_close(a, b)
    return got


def test_nudged_pool_routing_makes_no_host_sync_and_compiles_whole():
    """The tests above run the default routing (``free``: the free winners, recomputed from the
    window offsets); ``nudged`` (the max recomputed) keeps both promises too: no host sync, one
    graph under ``fullgraph=True`` (VGG10Skip: pooled layers with moving inputs, a skip)."""
    torch._dynamo.reset()
    net, x, y = _setup("vgg10skip")
    ep = ep_estimator(scheme="random", beta=0.05, K=4, check_finite=False, pool_routing="nudged",
                      generator=torch.Generator().manual_seed(0))
    with HostSyncs() as syncs:
        ep(net, x, y).surrogate.backward()
    assert syncs.calls == []
    compiled_equals_eager(ep, net, x, y)
