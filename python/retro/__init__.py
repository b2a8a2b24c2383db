"""retro: a thin RETRO model on retro_kernels, with real retrieval, training, decoding, evaluation
and the command line `retro`.

    import retro
    retro.build_database(retro.BuildOptions(corpus="docs/", out="db", valid_fraction=0.05))
    run = retro.train(retro.TrainOptions(db="db", out="run", config="tiny", steps=500))
    model, _ = retro.load_model(run)
    print(retro.evaluate(model, retro.Retriever.load("db")).bpb_on)
    retro.add_documents("db", "more_docs/")   # the database grows without a rebuild

(`retro.train`, `retro.generate` and `retro.evaluate` are the functions; their modules are
`retro.training.train`, `retro.decoding.generate` and `retro.evaluation.evaluate`; ARCHITECTURE.md maps
the sub-packages.)
"""
from .base.errors import RetroError
from .evaluation.evaluate import EvalResult, evaluate
from .decoding.generate import Generation, generate
from .decoding.inputs import ModelInputs, encode_for_model
from .model.config import PRESETS, RetroConfig, preset
from .model.model import RetroModel
from .retrofitting.load import from_pretrained
from .retrieval import BuildOptions, ChunkDatabase, Retriever, build_database, compute_neighbours
from .retrieval.compact import compact, remove_documents
from .retrieval.update import add_documents
from .retrofitting.wrapper import RetrofittedLM, retrofit
from .training.train import TrainOptions, load_model, train

__all__ = ["BuildOptions", "ChunkDatabase", "EvalResult", "Generation", "ModelInputs", "PRESETS", "RetroConfig",
           "RetroError", "RetroModel", "RetrofittedLM", "Retriever", "TrainOptions", "add_documents", "build_database",
           "compact", "compute_neighbours", "encode_for_model", "evaluate", "from_pretrained", "generate",
           "load_model", "preset", "remove_documents", "retrofit", "train"]
