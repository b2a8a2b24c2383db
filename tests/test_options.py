"""The command line is built from the options dataclasses: each default and help text lives in one
place (python/retro/options.py)."""
from __future__ import annotations

import dataclasses

import pytest

from retro.cli import build_parser
from retro.demo import DemoOptions
from retro.options import add_options, option, options_from_args
from retro.retrieval.build import BuildOptions
from retro.train import TrainOptions

COMMANDS = [("train", TrainOptions, ["--db", "d", "--out", "o"], dict(db="d", out="o")),
            ("build-db", BuildOptions, ["corpus", "--out", "o"], dict(corpus="corpus", out="o")),
            ("demo", DemoOptions, [], {})]


@pytest.mark.parametrize("command,cls,argv,required", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_the_command_line_defaults_are_the_dataclass_defaults(command, cls, argv, required):
    args = build_parser().parse_args([command, *argv])
    assert options_from_args(cls, args) == cls(**required)


@pytest.mark.parametrize("command,cls,argv,required", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_command_line_field_has_a_flag_and_help(command, cls, argv, required):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]  # noqa: SLF001 - argparse keeps them here
    dests = {a.dest: a for a in sub._actions}  # noqa: SLF001
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli", True):
            assert f.name in dests, f.name
            assert dests[f.name].help, f"{command} {f.name} has no help text"


def test_values_types_and_repeated_flags_reach_the_options():
    p = build_parser()
    t = options_from_args(TrainOptions, p.parse_args(["train", "--db", "d", "--out", "o", "-k", "3", "--lr", "0.01",
                                                       "--no-progress", "--no-retrieval", "--bf16"]))
    assert (t.k, t.lr, t.progress, t.retrieval, t.bf16) == (3, 0.01, False, False, True)
    d = options_from_args(DemoOptions, p.parse_args(["demo", "--include", "a*", "--include", "b", "-k", "2"]))
    assert d.include == ("a*", "b") and d.exclude == () and d.k == 2
    b = options_from_args(BuildOptions, p.parse_args(["build-db", "c", "--out", "o", "--batch-size", "8"]))
    assert b.embed_batch_size == 8  # a field renamed on the command line


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
