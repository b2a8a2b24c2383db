"""retro: a thin RETRO model on retro_kernels, with real retrieval, training, decoding, evaluation
and the command line `retro`."""
from .errors import RetroError
from .retrieval import BuildOptions, ChunkDatabase, Retriever, build_database, compute_neighbours

__all__ = ["BuildOptions", "ChunkDatabase", "RetroError", "Retriever", "build_database", "compute_neighbours"]
