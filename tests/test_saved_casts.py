"""Shared saved casts (``heal.saved_casts``): fewer bytes saved for backward, the same gradients."""

from __future__ import annotations


import pytest
import torch

pytest.importorskip("transformers")

from starfish.heal.saved_casts import SharedCasts, share_saved_casts  # noqa: E402

from lm_tiny import llama_config  # noqa: E402


def _llama() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_config(64)).train(False)
    for name, p in model.named_parameters():  # healing trains the projection weights, not norms or embeddings
        p.requires_grad_(name.endswith("proj.weight"))
    return model


def _step(model: torch.nn.Module, ids: torch.Tensor, shared: SharedCasts | None) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of one bf16-autocast step, and the bytes of the distinct storages saved for backward."""
    storages: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        t = shared.pack(t) if shared is not None else t.detach()
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, use_cache=False).logits.float().logsumexp(-1).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads, sum(storages.values())


def test_sharing_saves_fewer_bytes_and_gives_the_same_gradients_bit_for_bit():
    model = _llama()
    ids = torch.randint(0, 64, (3, 24), generator=torch.Generator().manual_seed(1))
    plain, plain_bytes = _step(model, ids, None)
    shared = SharedCasts()
    grads, shared_bytes = _step(model, ids, shared)
    # per layer: q/k/v read one normalised state (two copies shared), gate/up another (one shared)
    # the first layer's q/k/v input derives from no trained weight (frozen embedding and norm): no cast node to key on
    assert shared.shared == 3 * model.config.num_hidden_layers - 2
    assert shared_bytes < plain_bytes
    assert grads.keys() == plain.keys() and len(grads) == 7 * model.config.num_hidden_layers
    for name in plain:
        assert torch.equal(grads[name], plain[name]), name


def test_sharing_is_off_without_autocast_and_inert_without_gradients():
    with share_saved_casts("fp32") as shared:
        assert shared is None  # float32: no casts, no hooks
    model = _llama()
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad(), share_saved_casts("bf16") as shared, torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, use_cache=False)
        assert shared.shared == 0 and not shared.first  # nothing is saved without gradients
    with share_saved_casts("bf16") as shared, torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, use_cache=False).logits
        assert shared.shared > 0 and shared.first
    assert not shared.first  # released on exit: the keys' autograd nodes would keep a graph never run backward alive
    del out
