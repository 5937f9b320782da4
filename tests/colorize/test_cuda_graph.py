"""colorize.cuda_graph's cache logic on the CPU, with a stand-in for the captured graph.

The capture and replay themselves need CUDA: tests/test_cuda.py checks them against eager
sampling on a GPU.
"""
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
    with pytest.raises(ValueError, match="CUDA graphs need CUDA tensors"):
        cuda_graph.GraphedStep(step, torch.zeros(1, 4, 8, 8), torch.zeros(1), cond(1))
