"""The points where a long job's work so far is on disk, so that it may stop there and resume: a
database build after each unit of work of each stage, an update or a compact after each stage, a
training run before each optimizer step. Each calls `reached(stage, index)`, which does nothing.
The tests replace it (monkeypatch.setattr(hooks, "reached", ...) in their own process, an
assignment in a worker they start) to stop or kill the job exactly there, then check that it
resumes into what an uninterrupted job writes."""


def reached(stage: str, index: int = 0) -> None:
    """Called once unit `index` of `stage` is written: a build's "catalogue", "tokenizer",
    "tokenise" (per part), "terms", "embed", "merge" (per block), "index", "manifest" and
    "neighbours" (per block); an update's or a compact's "tokenise", "embed", "arrays", "index" and
    "manifest"; training's "step", before optimizer step `index` (0-based) runs. Does nothing."""
