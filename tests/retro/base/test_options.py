"""The command line is built from the options dataclasses: each default and help text lives in one
place (python/retro/base/options.py)."""
from __future__ import annotations

import dataclasses

import pytest

from retro.app.cli import build_parser
from retro.app.command_options import (ConvertOptions, DedupOptions, EvaluateOptions, GenerateOptions,
                                       NeighboursOptions, QueryOptions, ServeOptions, TokenizerOptions, TrainExtras)
from retro.app.demo import DemoOptions
from retro.decoding.generate import SamplingOptions
from retro.base.options import add_options, option, options_from_args
from retro.retrieval.build import BuildOptions
from retro.retrieval.compact import CompactOptions, RemoveOptions
from retro.retrieval.update import AddOptions
from retro.training.train import TrainOptions

# every command: a minimal command line and the options it must give (the dataclasses' defaults)
COMMANDS = [
    ("tokenizer", ["corpus", "--out", "t.model"], [TokenizerOptions(corpus="corpus", out="t.model")]),
    ("build-db", ["corpus", "--out", "o"], [BuildOptions(corpus="corpus", out="o")]),
    ("neighbours", ["db"], [NeighboursOptions(db="db")]),
    ("query", ["db", "some text"], [QueryOptions(db="db", text="some text")]),
    ("train", ["--db", "d", "--out", "o"], [TrainOptions(db="d", out="o"), TrainExtras()]),
    ("convert-checkpoint", ["run"], [ConvertOptions(run="run")]),
    ("generate", ["run", "a", "b c", "--db", "d"], [GenerateOptions(run="run", prompt=("a", "b c"), db="d"),
                                                    SamplingOptions()]),
    ("evaluate", ["run", "--db", "d"], [EvaluateOptions(run="run", db="d")]),
    ("dedup-against", ["e", "t"], [DedupOptions(eval="e", train="t")]),
    ("serve", ["run", "--db", "d"], [ServeOptions(run="run", db="d")]),
    ("demo", [], [DemoOptions()]),
    ("add-documents", ["db", "corpus"], [AddOptions(db="db", corpus="corpus")]),
    ("remove-documents", ["db"], [RemoveOptions(db="db")]),
    ("compact", ["db"], [CompactOptions(db="db")]),
    ("lm-eval", [], []),  # no flags of its own: main() hands `retro lm-eval ARGS` to lm-eval's command line
]


def subparser(parser, command):
    return parser._subparsers._group_actions[0].choices[command]  # noqa: SLF001 - argparse keeps them here


def test_every_command_is_covered():
    assert sorted(c[0] for c in COMMANDS) == sorted(build_parser()._subparsers._group_actions[0].choices)  # noqa: SLF001


@pytest.mark.parametrize("command,argv,expected", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_the_command_line_defaults_are_the_dataclass_defaults(command, argv, expected):
    args = build_parser().parse_args([command, *argv])
    assert [options_from_args(type(o), args) for o in expected] == expected


@pytest.mark.parametrize("command,argv,expected", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_flag_is_a_dataclass_field_with_help(command, argv, expected):
    """No flag is written by hand: each argument of the command is a field of one of its options
    dataclasses (so its default is the field's), and each command-line field has an argument
    with a help text."""
    sub = subparser(build_parser(), command)
    fields = {f.name: f for o in expected for f in dataclasses.fields(o) if f.metadata.get("cli", True)}
    dests = {a.dest: a for a in sub._actions if a.dest != "help"}  # noqa: SLF001
    assert set(dests) == set(fields), f"{command}: hand-written {set(dests) - set(fields)}, " \
                                      f"missing {set(fields) - set(dests)}"
    for name, action in dests.items():
        assert action.help, f"{command} {name} has no help text"


def test_values_types_and_repeated_flags_reach_the_options():
    p = build_parser()
    t = options_from_args(TrainOptions, p.parse_args(["train", "--db", "d", "--out", "o", "-k", "3", "--lr", "0.01",
                                                       "--no-progress", "--no-retrieval", "--bf16"]))
    assert (t.k, t.lr, t.progress, t.retrieval, t.bf16) == (3, 0.01, False, False, True)
    d = options_from_args(DemoOptions, p.parse_args(["demo", "--include", "a*", "--include", "b", "-k", "2"]))
    assert d.include == ("a*", "b") and d.exclude == () and d.k == 2
    b = options_from_args(BuildOptions, p.parse_args(["build-db", "c", "--out", "o", "--batch-size", "8"]))
    assert b.embed_batch_size == 8  # a field renamed on the command line
    g = p.parse_args(["generate", "r", "x", "--db", "d", "--no-retrieval", "--top-p", "0.5", "-k", "3"])
    assert (options_from_args(GenerateOptions, g).retrieval, options_from_args(SamplingOptions, g)) == \
        (False, SamplingOptions(top_p=0.5, k=3))
    t = options_from_args(TrainExtras, p.parse_args(["train", "--db", "d", "--out", "o", "--set", "dim=8", "--set",
                                                       "depth=2", "--retrofit", "gpt2", "--cca-layers", "1,3"]))
    assert t == TrainExtras(set=("dim=8", "depth=2"), retrofit="gpt2", cca_layers=(1, 3))


def test_a_new_field_appears_on_the_command_line():
    import argparse

    @dataclasses.dataclass
    class Opts:
        name: str = option(help="a name", positional=True)
        size: int | None = option(None, "a size")
        fast: bool = option(False, "go fast")
        tags: tuple[str, ...] = option((), "tags")
        hidden: int = option(3, cli=False)

    p = argparse.ArgumentParser()
    add_options(p, Opts)
    o = options_from_args(Opts, p.parse_args(["x", "--size", "4", "--fast", "--tags", "a"]))
    assert o == Opts("x", 4, True, ("a",), 3)
    with pytest.raises(SystemExit):
        p.parse_args(["x", "--hidden", "1"])
