"""The request body of POST /v1/completions (OpenAI's legacy completions API), checked by
pydantic: strict types (a number given as a string is refused), no unknown field, ranges as
OpenAI's. `retrieval` is this server's own: false decodes without neighbours (RETRO[OFF])."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str = Field(min_length=1)
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = Field(None, max_length=4)
    seed: int | None = Field(None, ge=0)
    stream: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    n: int = Field(1, ge=1, le=1)
    user: str | None = None
    retrieval: bool = True

    def stops(self) -> list[str]:
        """The stop strings as a list (empty ones dropped)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]
