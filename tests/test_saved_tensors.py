"""Lean saved tensors (``heal.saved_tensors``): fewer bytes saved for backward, the same gradients."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from starfish.heal.saved_tensors import Recompute, SavedTensors, lean_saved_tensors, unpack  # noqa: E402

from lm_tiny import llama_config  # noqa: E402


def _llama() -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_config(64)).train(False)
    for name, p in model.named_parameters():  # healing trains the projection weights, not norms or embeddings
        p.requires_grad_(name.endswith("proj.weight"))
    return model


def _step(model: nn.Module, loss_of, saved: SavedTensors | None, precision: str) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of one step (bf16 autocast or float32), and the bytes of the distinct storages saved for backward."""
    storages: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor):
        kept = saved.pack(t) if saved is not None else t.detach()
        if isinstance(kept, torch.Tensor) and (ptr := kept.untyped_storage().data_ptr()) not in params:
            storages[ptr] = kept.untyped_storage().nbytes()
        return kept

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        loss = loss_of(model)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads, sum(storages.values())


def _llama_loss(ids: torch.Tensor):
    return lambda model: model(input_ids=ids, use_cache=False).logits.float().logsumexp(-1).mean()


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_a_llama_saves_fewer_bytes_and_gets_the_same_gradients_bit_for_bit(precision):
    model = _llama()
    layers = model.config.num_hidden_layers
    loss_of = _llama_loss(torch.randint(0, 64, (3, 24), generator=torch.Generator().manual_seed(1)))
    plain, plain_bytes = _step(model, loss_of, None, precision)
    saved = SavedTensors()
    grads, lean_bytes = _step(model, loss_of, saved, precision)
    # per layer, the gated MLP's SiLU output (saved for the product) and the product (saved for down_proj)
    assert saved.recomputed == 2 * layers
    # under autocast, q/k/v read one normalised state (two copies shared), gate/up another (one shared);
    # the first layer's q/k/v input derives from no trained weight (frozen embedding and norm): no cast node to key on
    assert saved.shared == (3 * layers - 2 if precision == "bf16" else 0)
    # the two recomputed tensors are (tokens x intermediate) each, per layer
    intermediate = 3 * 24 * model.config.intermediate_size * (2 if precision == "bf16" else 4)
    assert plain_bytes - lean_bytes >= 2 * layers * intermediate
    assert grads.keys() == plain.keys() and len(grads) == 7 * layers
    for name in plain:
        assert torch.equal(grads[name], plain[name]), name


def test_a_gelu_mlp_recomputes_its_activation_and_a_frozen_factor_keeps_the_product():
    torch.manual_seed(0)
    scale = torch.randn(16)  # frozen: the product saves only the scale, not the state it multiplies
    mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(approximate="tanh"), nn.Linear(16, 8))
    x = torch.randn(5, 8)

    def loss_of(model):
        h = model[1](model[0](x))
        return model[2](h * scale).square().sum() + model[2](h).sum()

    plain, _ = _step(mlp, loss_of, None, "fp32")
    saved = SavedTensors()
    grads, _ = _step(mlp, loss_of, saved, "fp32")
    assert saved.recomputed == 1  # the GELU output read by the product and the second Linear; the product is kept
    for name in plain:
        assert torch.equal(grads[name], plain[name]), name


def test_a_recomputed_view_reads_the_entries_of_the_original():
    g = torch.randn(4, 6, requires_grad=True)
    u = torch.randn(4, 6, requires_grad=True)
    out = torch.nn.functional.silu(g) * u
    view = out.t()[1:3]  # strided, with an offset
    recipe = SavedTensors().pack(view)
    assert isinstance(recipe, Recompute)
    assert torch.equal(unpack(recipe), view.detach()) and unpack(recipe).stride() == view.stride()


def test_inert_without_gradients_and_releases_a_graph_never_run_backward():
    model = _llama()
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad(), lean_saved_tensors() as saved, torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, use_cache=False)
        assert saved.shared == saved.recomputed == 0 and not saved.first  # nothing is saved without gradients
    with lean_saved_tensors() as saved, torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, use_cache=False).logits
        assert saved.shared > 0 and saved.first and saved.recomputed > 0
    assert not saved.first  # released on exit: the keys' autograd nodes would keep a graph never run backward alive
    ref = weakref.ref(saved)
    del out, saved
    gc.collect()
    assert ref() is None  # nothing saved for backward (recipes included) keeps the hooks' state alive
