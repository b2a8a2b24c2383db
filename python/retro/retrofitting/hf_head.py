"""A Hugging Face causal LM's output layer applied apart from its forward, so that a retrofitted
model's loss can run it a slice of the sequence at a time (sliced_loss.py): the output embeddings,
then the post-processing of the families that have one, and a check that together they reproduce
the model's own logits (other families may post-process in ways not listed here)."""
from __future__ import annotations

import torch
from torch import Tensor


def head_logits(hf_model, states: Tensor) -> Tensor:
    """Final decoder states (..., hidden) -> logits (..., V) as hf_model's forward computes them:
    get_output_embeddings(), then Gemma 2/3's final_logit_softcapping (cap * tanh(logits / cap)),
    Cohere's logit_scale (times) or Granite's logits_scaling (divided by)."""
    head = hf_model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(hf_model).__name__} has no output embeddings (get_output_embeddings() is None)")
    logits = head(states)
    config = _text_config(hf_model)
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(hf_model, "logit_scale", None)  # Cohere keeps config.logit_scale on the model
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        logits = logits * scale
    scaling = getattr(config, "logits_scaling", None)
    if scaling:
        logits = logits / scaling
    return logits


def _text_config(hf_model):
    config = hf_model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def decoder_states(hf_model, **kwargs) -> Tensor:
    """The final states (B, n, hidden) of hf_model's decoder (get_decoder(): its embeddings,
    blocks and final norm) called with kwargs (input_ids=..., and what the blocks are handed)."""
    return hf_model.get_decoder()(**kwargs).last_hidden_state


@torch.no_grad()
def head_mismatch(hf_model, length: int = 8) -> str | None:
    """None when head_logits(decoder_states(...)) reproduces hf_model(...).logits on tokens
    0 .. length-1 to within 64 float roundings of the largest logit (same dtype, same device);
    otherwise why not (a shape, the largest difference, or the error raised)."""
    p = next(hf_model.parameters())
    tokens = torch.arange(min(length, _text_config(hf_model).vocab_size), device=p.device)[None]
    try:
        want = hf_model(input_ids=tokens, use_cache=False).logits
        got = head_logits(hf_model, decoder_states(hf_model, input_ids=tokens, use_cache=False))
    except Exception as exc:  # noqa: BLE001 - any family whose decoder or head is not reached this way
        return f"{type(exc).__name__}: {exc}"
    if got.shape != want.shape:
        return f"logits of shape {tuple(got.shape)} instead of {tuple(want.shape)}"
    tol = 64 * torch.finfo(want.dtype).eps * (1 + want.abs().max().item())
    err = (got - want).abs().max().item()
    return None if err <= tol else f"logits differing by up to {err:.3g} (tolerance {tol:.3g})"
