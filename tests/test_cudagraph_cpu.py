"""CPU checks of the CUDA-graph module's pure logic (the GPU behaviour is in test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from coop_dbo.cudagraph_capture import DBOGraphRunner, StepGraph
from coop_dbo.errors import CaptureError


def stand_in_graph(*static: torch.Tensor) -> StepGraph:
    g = object.__new__(StepGraph)  # no CUDA here: only the input checks are exercised
    g.static_inputs = static
    g.graph = None
    return g


def test_step_graph_accepts_only_the_captured_layout() -> None:
    g = stand_in_graph(torch.zeros(8, 5), torch.zeros(8, dtype=torch.int64))
    assert g.accepts((torch.ones(8, 5), torch.ones(8, dtype=torch.int64))) == ""
    assert g.accepts((torch.ones(8, 1), torch.ones(8, dtype=torch.int64))) == (
        "input 0 was captured as torch.float32 (8, 5) on cpu, got torch.float32 (8, 1) on cpu")
    assert "captured with 2 inputs, got 1" in g.accepts((torch.ones(8, 5),))
    assert "got torch.int32" in g.accepts((torch.ones(8, 5), torch.ones(8, dtype=torch.int32)))
    with pytest.raises(CaptureError, match=r"call capture\(\) first"):
        g.replay((torch.ones(8, 5), torch.ones(8, dtype=torch.int64)))


def test_graph_runner_routes_other_layouts_to_eager() -> None:
    r = object.__new__(DBOGraphRunner)
    r.graphs = {8: stand_in_graph(torch.zeros(8, 5)), 16: stand_in_graph(torch.zeros(16, 5))}
    assert r.accepts((torch.ones(3, 5),))
    assert not r.accepts((torch.ones(3, 1),))  # would broadcast into the static input
    assert not r.accepts((torch.ones(3, 5, dtype=torch.float64),))
    assert not r.accepts((torch.ones(3, 5), torch.ones(3, 5)))
