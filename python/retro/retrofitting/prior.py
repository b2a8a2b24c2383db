"""The copy prior of a retrofitted model: its new parts start as a circuit that copies from the
neighbours, fitted to the frozen base on a few training sequences, so that reading the neighbours
pays from the first step (the small RETRO's prior, RetroModel.apply_copy_prior, assumes decoder
and encoder share one embedding space; a pretrained base's residual stream is its own, hence the fit).

With the encoder's sublayers at zero, a neighbour token t enters CCA as S(t), its base input
embedding projected and normalised. Per CCA layer i:
- the query reads *the current token* from the residual stream: a ridge regression from the
  normalised states at layer i to S(current token), fitted on the sequences (the fit's cosine is
  logged; 0.9 on SmolLM2's upper layers);
- the keys are S(t), smeared 90% onto the next neighbour token (smear_keys), so the query finds
  "the token after an occurrence of mine" in the neighbours;
- the values are S(t), and the output maps S(t) to the residual direction that raises token t's
  logit: a ridge regression from S(t) to the unembedding row of t divided by the final norm's
  gain, over the whole vocabulary.
Only the top CCA layer writes at first (the others' output projections stay at zero: the base
model's blocks above them have not learnt to read the injected direction); its scale and the
attention gain are chosen on the sequences, with their neighbours, as those of lowest loss on a
short grid. Every weight stays trainable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base.defaults import IGNORE
from ..model.copy_prior import SMEAR, zero_encoder_outputs

GAIN = 40.0                                    # qk_norm's gain: sharp matches among k x 2m neighbour tokens
SCALES = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 2.0)  # of the residual stream's norm at the layer


def ridge(x: Tensor, y: Tensor, lam: float) -> Tensor:
    """x (N, d), y (N, e) -> W (e, d) minimising |x W^T - y|^2 + lam N |W|^2 (in float64)."""
    x, y = x.double(), y.double()
    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    return torch.linalg.solve(x.T @ x + lam * len(x) * eye, x.T @ y).T


def _final_norm_gain(base) -> Tensor | None:
    """The weight of the base's final norm (before the unembedding), if it has one."""
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.base_model
    for name in ("norm", "ln_f", "final_layernorm"):
        norm = getattr(decoder, name, None)
        if norm is not None and getattr(norm, "weight", None) is not None:
            return norm.weight.double()
    return None


def _batch_loss(model, batch) -> float:
    logits = model(batch.tokens, batch.neighbours, batch.neighbour_mask).float()
    return F.cross_entropy(logits.transpose(1, 2), batch.targets, ignore_index=IGNORE).item()


@torch.no_grad()
def fit_copy_prior(model, batch, log=print, lam: float = 1e-3) -> dict:
    """Sets model's (a RetrofittedLM) new weights to the copy prior fitted on batch (data.Batch:
    tokens (B, n), targets, neighbours (B, n/m, k, 2m), neighbour_mask). Returns what was chosen
    (the loss on the batch without the prior and with it, gain, scale, the query fits)."""
    cfg, m = model.cfg, model.cfg.chunk_size
    was_training = model.training
    model.eval()
    zero_encoder_outputs(model.encoder)
    dt = model.to_encoder.weight.dtype
    emb = model.base.get_input_embeddings().weight.to(dt)          # (V, hidden)
    hidden, enc, inner = emb.shape[1], cfg.enc_dim, cfg.heads * cfg.head_dim
    gen = torch.Generator().manual_seed(0)
    if enc == hidden:
        model.to_encoder.weight.copy_(torch.eye(enc, hidden))
    else:
        model.to_encoder.weight.copy_(torch.linalg.qr(torch.randn(hidden, hidden, generator=gen))[0][:enc])
    s_all = model.encoder_in_norm(model.to_encoder(emb)).double()  # (V, enc): S(t)
    wide = max(inner, enc)
    proj = (torch.eye(inner, enc) if inner == enc else
            torch.linalg.qr(torch.randn(wide, wide, generator=gen))[0][:inner, :enc]).double()
    unembed = model.base.get_output_embeddings().weight.double()   # (V, hidden)
    gain = _final_norm_gain(model.base)
    target = unembed / gain if gain is not None else unembed
    out_map = ridge(s_all, target, lam)                           # (hidden, enc): S(t) -> a push towards t
    out_map /= (s_all @ out_map.T).norm(dim=-1).mean()            # unit mean push

    states = model.residual_states(batch.tokens)                  # {layer: (B, n, hidden)} at CCA's input
    current = s_all[batch.tokens[:, m - 1:].reshape(-1)]          # S(current token) at the reading positions
    fits, rms = {}, {}
    for i in cfg.cca_layers:
        cca, norm = model.cca[str(i)], model.cca_norm[str(i)]
        x = norm(states[i])[:, m - 1:].reshape(-1, hidden).double()
        reader = ridge(x, current, lam)                           # (enc, hidden)
        fits[i] = round(float(F.cosine_similarity(x @ reader.T, current, dim=-1).mean()), 3)
        rms[i] = float(states[i].norm(dim=-1).mean())
        cca.to_q.weight.copy_(proj @ reader)
        cca.to_k.weight.copy_(proj)
        cca.to_v.weight.copy_(proj)
        cca.to_out.weight.zero_()
        if cca.qk_gain is not None:
            cca.qk_gain.fill_(GAIN)
        if cca.smear is not None:
            cca.smear.fill_(SMEAR)
    top = model.cca[str(max(cfg.cca_layers))]
    losses = {0.0: _batch_loss(model, batch)}
    best = 0.0
    for scale in SCALES:                                           # lowest loss; stop once it rises
        top.to_out.weight.copy_(scale * rms[max(cfg.cca_layers)] * out_map @ proj.T)
        losses[scale] = _batch_loss(model, batch)
        if losses[scale] < losses[best]:
            best = scale
        elif scale > best:
            break
    top.to_out.weight.copy_(best * rms[max(cfg.cca_layers)] * out_map @ proj.T)
    model.train(was_training)
    chosen = {"loss_without": losses[0.0], "loss": losses[best], "scale": best, "gain": GAIN, "query_fit_cos": fits,
              "losses": {str(k): round(v, 4) for k, v in losses.items()}}
    log(f"[retrofit] copy prior fitted on {batch.tokens.shape[0]} sequences: loss {losses[0.0]:.4f} -> "
        f"{losses[best]:.4f} (scale {best:g}; query fits {fits})")
    return chosen
