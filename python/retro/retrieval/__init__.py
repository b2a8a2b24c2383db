"""Retrieval: corpus -> tokenizer -> chunks -> frozen-BERT keys -> faiss index -> neighbours."""
from .corpus import CorpusReport, iter_documents
from .build import BuildOptions, build_database
from .database import ChunkDatabase
from .embedder import DEFAULT_EMBEDDER, BertEmbedder, make_embedder
from .neighbours import compute_neighbours, load_neighbours
from .retriever import Retriever
from .search import SearchResult
from .static_embedder import STATIC_PREFIX, StaticEmbedder
from .tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer

__all__ = ["BertEmbedder", "BuildOptions", "ChunkDatabase", "CorpusReport", "DEFAULT_EMBEDDER", "HFTokenizer",
           "Retriever", "STATIC_PREFIX", "SearchResult", "SentencePieceTokenizer", "StaticEmbedder", "build_database",
           "compute_neighbours", "iter_documents", "load_neighbours", "load_tokenizer", "make_embedder"]
