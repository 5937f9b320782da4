"""colorize.cuda_graph's cache logic on the CPU, with a stand-in for the captured graph.

The capture and replay themselves need CUDA: tests/test_cuda.py checks them against eager
sampling on a GPU.
"""
import contextlib

import pytest
import torch

from cldm.color import ColorCondition
from colorize import cuda_graph


class FakeGraph:
    """Records what GraphCache asks of a graph; runs the step eagerly."""

    made = []

    def __init__(self, step, x, t, cond):
        self.step, self.cond, self.conditions = step, cond, [cond]
        FakeGraph.made.append(self)

    def set_condition(self, cond):
        self.cond = cond
        self.conditions.append(cond)

    def __call__(self, x, t):
        return self.step(x, t, self.cond)


@pytest.fixture
def fake(monkeypatch):
    FakeGraph.made = []
    monkeypatch.setattr(cuda_graph, "GraphedStep", FakeGraph)
    return FakeGraph.made


def cond(b, value=0.0):
    return ColorCondition(torch.full((b, 3, 4), value), torch.full((b, 2, 8, 8), value), None)


def step(x, t, c):
    return x + c.guided_hint.mean() + t[:, None, None, None]


def sample(cache, c, tag=(), steps=3):
    x = torch.zeros(len(c), 4, 8, 8)
    fn = cache.step_fn(step, x, c, tag)
    for i in range(steps):
        x = fn(x, torch.full((len(c),), i))
    return x


def test_one_graph_per_shape_and_tag_condition_copied_once_per_sampling(fake):
    cache = cuda_graph.GraphCache()
    a, b, short = cond(2, 1.0), cond(2, 5.0), cond(1, 2.0)
    assert torch.equal(sample(cache, a), torch.full((2, 4, 8, 8), 3 * 1.0 + 0 + 1 + 2))
    assert torch.equal(sample(cache, b), torch.full((2, 4, 8, 8), 3 * 5.0 + 3))  # the new batch's condition
    sample(cache, short)
    assert len(fake) == 2                                    # batch 2 (reused) and batch 1
    assert fake[0].conditions == [a, b]                      # b copied in once, not at every step
    sample(cache, a, tag=("other model", 2.0))
    assert len(fake) == 3                                    # another step function: its own graph


def test_signature_covers_shapes_dtypes_and_missing_fields():
    x = torch.zeros(2, 4, 8, 8)
    assert cuda_graph.signature(x, cond(2)) == cuda_graph.signature(x.clone(), cond(2, 7.0))
    assert cuda_graph.signature(x, cond(2)) != cuda_graph.signature(x.half(), cond(2))
    with_concat = ColorCondition(cond(2).context, cond(2).guided_hint, torch.zeros(2, 5, 8, 8))
    assert cuda_graph.signature(x, cond(2)) != cuda_graph.signature(x, with_concat)
    # a graph replays on the device it was captured on: inputs elsewhere need their own
    assert cuda_graph.signature(x, cond(2)) != cuda_graph.signature(x.to("meta"), cond(2))


def test_graphs_need_cuda_tensors():
    for device in ("cpu", "meta"):  # not only the CPU
        with pytest.raises(ValueError, match=f"^CUDA graphs need CUDA tensors, got {device}$"):
            cuda_graph.GraphedStep(step, torch.zeros(1, 4, 8, 8, device=device), torch.zeros(1, device=device),
                                   cond(1))


def test_a_condition_rebuilt_from_its_fields_is_the_same():
    """GraphedStep clones the condition field by field into a new ColorCondition."""
    c = ColorCondition(torch.zeros(1, 3, 4), torch.ones(1, 2, 8, 8), torch.full((1, 5, 8, 8), 2.0))
    again = ColorCondition(*cuda_graph._fields(c))
    assert again.context is c.context and again.guided_hint is c.guided_hint and again.concat is c.concat


def inputs_only(x, c):
    """A GraphedStep as its __init__ leaves the graph's inputs, without the capture (CUDA only)."""
    g = object.__new__(cuda_graph.GraphedStep)
    g.signature, g.x = cuda_graph.signature(x, c), x.clone()
    g.cond = ColorCondition(*(None if f is None else f.clone() for f in cuda_graph._fields(c)))
    return g


def with_concat(b, value):
    return ColorCondition(torch.full((b, 3, 4), value), torch.full((b, 2, 8, 8), value),
                          torch.full((b, 5, 8, 8), value))


def test_set_condition_copies_into_the_graphs_own_tensors():
    """The graph reads the tensors it was captured with: every field is copied in place."""
    x = torch.zeros(2, 4, 8, 8)
    for make in (with_concat, cond):  # with and without the concat input
        g = inputs_only(x, make(2, 1.0))
        static = cuda_graph._fields(g.cond)
        g.set_condition(make(2, 5.0))
        assert all(a is b for a, b in zip(cuda_graph._fields(g.cond), static))
        assert [None if f is None else f.unique().tolist() for f in static] == \
            [[5.0], [5.0], [5.0] if make is with_concat else None]


def test_set_condition_refuses_other_shapes_and_dtypes_and_copies_nothing():
    x = torch.zeros(2, 4, 8, 8)
    g = inputs_only(x, with_concat(2, 1.0))
    half = with_concat(2, 5.0)
    half = ColorCondition(half.context, half.guided_hint.half(), half.concat)
    for other in (with_concat(1, 5.0), cond(2, 5.0), half):
        with pytest.raises(ValueError, match="^condition shapes differ from the captured graph's$"):
            g.set_condition(other)
    assert all(f.unique().tolist() == [1.0] for f in cuda_graph._fields(g.cond))


def test_a_call_copies_x_and_t_in_replays_and_returns_a_copy(monkeypatch):
    """The replay reads the static x and t and overwrites the static output, so a call must copy
    both inputs in and hand back a copy that the next step's replay leaves alone."""
    x = torch.zeros(2, 4, 8, 8)
    g = inputs_only(x, cond(2))
    g.device, g.t, g.out = torch.device("cpu"), torch.zeros(2), torch.zeros_like(x)

    class Replay:  # what the captured step does: writes its output tensor in place from its inputs
        def replay(self):
            g.out.copy_(g.x * 10 + g.t[:, None, None, None])

    g.graph = Replay()
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    x1, x2 = torch.full((2, 4, 8, 8), 1.0), torch.full((2, 4, 8, 8), 2.0)
    first = g(x1, torch.tensor([3.0, 4.0]))
    second = g(x2, torch.tensor([5.0, 6.0]))
    assert first[:, 0, 0, 0].tolist() == [13.0, 14.0] and first.unique().numel() == 2
    assert second[:, 0, 0, 0].tolist() == [25.0, 26.0] and second.unique().numel() == 2
