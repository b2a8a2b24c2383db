"""The one model contract: what training, decoding, evaluation, serving and saving ask of a model.
RetroModel (model.py) and RetrofittedLM (retrofitting/wrapper.py) both satisfy it, so no caller asks
which class it holds."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from retro_kernels import ChunkedCrossAttention, RetroEncoder

from .config import RetroConfig


@runtime_checkable
class RetrievalLM(Protocol):
    cfg: RetroConfig
    supports_checkpointing: bool  # whether `checkpointing = True` (activation checkpointing) works
    checkpointing: bool
    extra_config: dict            # what config.json records beside the configuration ({} for a RetroModel)
    trained_on: dict | None       # the identity of the database it was trained on (None: not recorded)
    source: str | None            # where it was loaded from; errors name it

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder blocks (a retrofitted model's: its base's), which FSDP shards one by one."""

    encoder: RetroEncoder

    def forward(self, tokens: Tensor, neighbour_tokens: Tensor | None = None, neighbour_mask: Tensor | None = None,
                targets: Tensor | None = None) -> Tensor:
        """tokens (B, n), neighbours (B, n/m, k, 2m) -> logits (B, n, V); with targets (B, n) the
        per-token NLL (B, n) instead (sliced_loss.py)."""

    def cca_modules(self) -> dict[int, ChunkedCrossAttention]:
        """The CCA blocks by layer index."""

    def new_state(self, batch: int, max_len: int, device=None, dtype=None, num_neighbours: int | None = None):
        """Caches for decoding `batch` sequences of up to max_len tokens."""

    def prefill(self, state, tokens: Tensor, neighbour_tokens: Tensor | None = None,
                neighbour_mask: Tensor | None = None, lengths: list[int] | None = None) -> Tensor:
        """The prompts (B, n), row r's its first lengths[r] tokens, in one pass -> logits (B, V)."""

    def step(self, state, tokens: Tensor, new_neighbours: dict) -> Tensor:
        """One token per sequence (B,) -> logits (B, V)."""

    def compile_decoding(self, mode: str | None = None, fullgraph: bool = True, backend: str = "inductor"):
        """Compiles step(); a RetroError where the model decodes eagerly only."""

    def fit_copy_prior(self, batch, log=print) -> dict | None:
        """The copy-prior hook, called before the first training step: fits the prior on batch
        (training.data.Batch with neighbours) and returns what was chosen, recorded in extra_config;
        None where the prior needs no data (a RetroModel's is set at construction)."""

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The weights training changes: what a checkpoint and a saved model hold."""
