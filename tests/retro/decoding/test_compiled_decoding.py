"""Compiled decoding (RetroModel.compile_decoding) as CUDA graphs need it, checked on the CPU:
static caches (one set per shape, reset in place, stale handles refused) and one CUDA-graph
generation per step (marked before the step's first half, so its output survives until the
second half reads it). tests/kernels/test_gpu.py replays the graphs on a GPU against eager decoding."""
import pytest
import torch

from retro.base.errors import RetroError
from retro.model.model import RetroModel
from tests.retro.model.test_model import inputs, tiny


def model_and_inputs():
    torch.manual_seed(0)
    model = RetroModel(tiny(depth=2, cca_layers=(1,), enc_depth=1)).eval()
    return model, inputs(B=2, n=12, K=2)


def test_compiled_decoding_keeps_one_set_of_caches_per_shape_and_resets_it():
    model, (tok, nb, mask) = model_and_inputs()
    model.compile_decoding()
    first = model.new_state(2, 16)
    with torch.no_grad():
        model.prefill(first, tok[:, :9], nb[:, :2], mask[:, :2], [9, 6])
    assert any(t.abs().sum() > 0 for t in first.tensors()[1:])  # the prefill wrote them
    second = model.new_state(2, 16)
    assert [t.data_ptr() for t in second.tensors()] == [t.data_ptr() for t in first.tensors()]
    assert all(not t.any() for t in second.tensors()), "a reused set of caches must start empty"
    other = model.new_state(3, 16)  # another shape: caches of its own
    assert other.pos.data_ptr() != first.pos.data_ptr()
    with pytest.raises(RetroError, match="stale"):
        model.step(first, tok[:, 0], {})
    model.step(second, tok[:, 0], {})  # the latest handle steps
    model.eager_decoding()
    fresh = model.new_state(2, 16)
    assert fresh.pos.data_ptr() != first.pos.data_ptr()  # eager: new caches each time


def test_a_state_made_before_compiling_is_refused_by_the_compiled_step():
    model, (tok, _, _) = model_and_inputs()
    state = model.new_state(2, 16)
    model.compile_decoding()
    with pytest.raises(RetroError, match="compile_decoding"):
        model.step(state, tok[:, 0], {})


def test_each_compiled_step_is_one_cuda_graph_generation(monkeypatch):
    """The mark comes before the first half of every step, never between the halves: CUDA-graph
    trees free a generation's outputs when the next one starts."""
    model, (tok, nb, mask) = model_and_inputs()
    events = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: events.append("mark"))
    model.compile_decoding()
    below, above = model._step_below, model._step_above
    model._compiled_step = (lambda *a: events.append("below") or below(*a),   # the eager halves, traced
                            lambda *a: events.append("above") or above(*a))
    encode = model.encode
    monkeypatch.setattr(model, "encode", lambda *a: events.append("encode") or encode(*a))
    state = model.new_state(2, 16)
    with torch.no_grad():
        for t in range(5):  # position 3 completes the first chunk (m = 4)
            new = {r: (nb[r, 0], mask[r, 0]) for r in range(2)} if t == 3 else {}
            model.step(state, tok[:, t], new)
    step = ["mark", "below", "above"]
    assert events == step * 3 + ["mark", "below", "encode", "above"] + step
