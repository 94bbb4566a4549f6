"""The Weighted ARD tracker (pcn_ep/tools/ard.py) against a hand count, and on real steps."""
import copy
import math

import torch

from pcn_ep.core import MLP, Backprop, Dynamics, EquilibriumPropagation
from pcn_ep.tools.ard import measure, step_ard
from pcn_ep.training.fastfit import sgd, training_step


def test_weighted_ard_of_a_few_ops_equals_the_hand_count():
    W, x, b = torch.randn(2, 3), torch.randn(3), torch.randn(2)

    def step():
        h = torch.mv(W, x)
        r = torch.relu(h)
        r.add_(x[:2])  # in place, reads a view of x
        W.t() * 2  # the transpose is a view: only the product moves data
        q = r * r  # r is read once
        q + b  # b was never written: skipped, but its floats pass

    tracker = measure(step, [W, x])
    # (size, distance) of each read; every access advances the clock by its size, in order
    # start: W (6 floats) written at 0, x (3) at 6 -> clock 9
    # mv:    read W at 9: d=9, clock 15; read x at 15: d=15-6=9, clock 18; write h at 18 -> 20
    # relu:  read h (2) at 20: d=2, clock 22; write r at 22 -> 24
    # add_:  read r at 24: d=2, clock 26; read x[:2] (2) at 26: d=26-6=20 (from x's write, not its
    #        last read), clock 28; write r at 28 -> 30
    # mul:   read W (6) at 30: d=30, clock 36; write the product at 36 -> 42
    # r*r:   read r (2) at 42: d=42-28=14, clock 44; write q at 44 -> 46
    # q+b:   read q at 46: d=2, clock 48; read b: never written, skipped, clock 50; write at 50 -> 52
    reads = [(6, 9), (3, 9), (2, 2), (2, 2), (2, 20), (6, 30), (2, 14), (2, 2)]
    assert tracker.reads == reads
    assert tracker.clock == 52 and tracker.unwritten_reads == 1 and tracker.writes == 2 + 6
    assert tracker.weighted_ard == 341 / 25
    assert math.isclose(tracker.dmc, sum(s * math.sqrt(d) for s, d in reads))


def test_a_broadcast_operand_counts_its_distinct_floats_once():
    b, m = torch.randn(4), torch.randn(5, 4)
    tracker = measure(lambda: m + b.expand(5, 4), [b, m])
    # b (4) at 0, m (20) at 4 -> 24; read m (20): d=20, clock 44; read b as 4 floats: d=44
    assert tracker.reads == [(20, 20), (4, 44)]


def test_a_tracked_step_sees_backward_and_optimizer_and_changes_nothing():
    torch.manual_seed(0)
    x, y = torch.randn(1, 6), torch.tensor([1])
    results = {}
    for name, est in (("bp", Backprop("ce")),
                      ("ep", EquilibriumPropagation("ce", "nudge", "centered", 0.05, Dynamics(4)))):
        net = MLP(6, 2, hidden=(8,))
        twin = copy.deepcopy(net)
        tracker = step_ard(net, est, sgd(net, 0.1, 0.9, 0.01), x, y)
        training_step(twin, est, sgd(twin, 0.1, 0.9, 0.01), x, y)
        assert all(torch.equal(p, q) for p, q in zip(net.parameters(), twin.parameters()))
        resident = sum(p.numel() for p in net.parameters()) + x.numel() + y.numel()
        # every parameter is rewritten by the SGD step, after the backward pass
        assert all(tracker.stamp[p.untyped_storage().data_ptr()] >= resident
                   for p in net.parameters())
        assert tracker.unwritten_reads == 0
        results[name] = tracker
    assert results["ep"].clock > results["bp"].clock  # the nudged phase moves data too
