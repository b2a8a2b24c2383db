"""The request bodies, checked by pydantic: strict types (a number given as a string is refused),
no unknown field. POST /v1/completions: OpenAI's legacy completions API, its ranges as OpenAI's;
`retrieval` is this server's own: false decodes without neighbours (RETRO[OFF]). POST
/v1/documents (this server's own): the documents to add to the database."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


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


class Document(BaseModel):
    """A document to add: its text, and optionally its source (a name, which `retro remove-documents
    --path` matches; default: the server's file of the request and the document's line in it)."""
    model_config = ConfigDict(extra="forbid", strict=True)

    text: str
    source: str | None = Field(None, min_length=1)


class DocumentsRequest(BaseModel):
    """{"documents": [...]}: each a {"text", "source"} object or a plain string (its text)."""
    model_config = ConfigDict(extra="forbid", strict=True)

    documents: list[Document] = Field(min_length=1)

    @field_validator("documents", mode="before")
    @classmethod
    def _strings(cls, documents):
        """A string is a document's text; anything but a string or an object is refused by its index."""
        if not isinstance(documents, list):
            return documents  # pydantic's own error: a list is expected
        for i, d in enumerate(documents):
            if not isinstance(d, (str, dict)):
                raise ValueError(f"document {i} is {d!r}: give a string or an object {{\"text\", \"source\"}}")
        return [{"text": d} if isinstance(d, str) else d for d in documents]

    @field_validator("documents")
    @classmethod
    def _texts(cls, documents: list[Document]) -> list[Document]:
        for i, d in enumerate(documents):
            if not d.text.strip():
                raise ValueError(f"document {i} has no text (an empty or blank string): give each document "
                                 "some text")
        return documents

    def pairs(self) -> list[tuple[str, str | None]]:
        """(text, source or None) of each document."""
        return [(d.text, d.source) for d in self.documents]
