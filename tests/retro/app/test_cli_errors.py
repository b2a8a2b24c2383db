"""The command line's user mistakes: each ends as one line `retro <verb>: error: ...` on stderr
naming the offending value, with a non-zero exit and no traceback, before any work starts. The
options dataclasses give the Python API the same checks."""
import pytest

from retro import BuildOptions, RetroError, TrainOptions
from retro.app.cli import main, parse_overrides
from retro.app.demo import DemoOptions
from retro.decoding.generate import SamplingOptions
from retro.model.model import check_config_fields

TRAIN = ["train", "--db", "{tmp}/db", "--out", "{tmp}/run"]
GENERATE = ["generate", "{tmp}/run", "a prompt", "--db", "{tmp}/db"]
BUILD = ["build-db", "{tmp}/corpus", "--out", "{tmp}/out"]
EVALUATE = ["evaluate", "{tmp}/run", "--db", "{tmp}/db"]

# (arguments, text the error line must contain): {tmp} is the test's folder, which holds a
# corpus of one binary file
BAD = [
    ([], "required: command"),
    (["frobnicate"], "'frobnicate'"),
    (["train", "--out", "x"], "--db"),
    (TRAIN + ["--config", "no-such-preset"], "'no-such-preset'"),
    (TRAIN + ["--set", "no_such_field=1"], "no_such_field"),
    (TRAIN + ["--set", "dim=wide"], "'wide'"),
    (TRAIN + ["--set", "dim=1.5"], "1.5"),
    (TRAIN + ["--set", "qk_norm=yes"], "'yes'"),
    (TRAIN + ["--set", "dropout=1.5"], "1.5"),
    (TRAIN + ["--set", "cca_layers=a,b"], "'a'"),
    (TRAIN + ["--set", "novalue"], "'novalue'"),
    (TRAIN + ["--steps", "-5"], "-5"),
    (TRAIN + ["--steps", "abc"], "'abc'"),
    (TRAIN + ["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (TRAIN + ["--seq-chunks", "0"], "--seq-chunks must be an integer >= 1, got 0"),
    (TRAIN + ["-k", "0"], "got 0"),
    (TRAIN + ["-k", "41"], "41"),
    (TRAIN + ["--lr", "-1"], "-1"),
    (TRAIN + ["--lr", "nan"], "nan"),
    (TRAIN + ["--warmup", "-1"], "-1"),
    (TRAIN + ["--grad-clip", "0"], "--grad-clip must be a number > 0, got 0.0"),
    (TRAIN + ["--time-budget", "0"], "--time-budget must be a number > 0, got 0.0"),
    (TRAIN + ["--cca-layers", "1,x"], "'1,x'"),
    (TRAIN + ["--bogus-flag"], "--bogus-flag"),
    (TRAIN, "{tmp}/db"),  # no database there
    (GENERATE + ["--temperature", "-1"], "-1"),
    (GENERATE + ["--top-p", "1.5"], "1.5"),
    (GENERATE + ["--top-p", "0"], "--top-p must be a number in (0, 1], got 0.0"),
    (GENERATE + ["--top-k", "-3"], "-3"),
    (GENERATE + ["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1, got 0"),
    (GENERATE + ["-k", "99"], "99"),
    (GENERATE, "{tmp}/run"),  # no checkpoint there
    (BUILD + ["--chunk-size", "0"], "--chunk-size must be an integer >= 1, got 0"),
    (BUILD + ["--valid-fraction", "1.0"], "1.0"),
    (BUILD + ["--target-recall", "0"], "--target-recall must be a number in (0, 1], got 0.0"),
    (BUILD + ["--vocab-size", "3"], "got 3"),
    (BUILD + ["--index", "nope"], "'nope'"),
    (BUILD + ["--include", ""], "''"),
    (BUILD, "1 binary"),  # the corpus holds no text file
    (["build-db", "{tmp}/missing", "--out", "{tmp}/out2"], "{tmp}/missing"),
    (EVALUATE + ["-k", "41"], "41"),
    (EVALUATE + ["--db-fraction", "1.5"], "1.5"),
    (EVALUATE + ["--max-documents", "0"], "--max-documents must be an integer >= 1, got 0"),
    (["neighbours", "{tmp}/db", "-k", "0"], "got 0"),
    (["neighbours", "{tmp}/db", "--extra", "-1"], "-1"),
    (["query", "{tmp}/db", "text", "-k", "0"], "got 0"),
    (["demo", "--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["demo", "--valid-fraction", "1"], "1.0"),
    (["demo", "--config", "huge"], "'huge'"),
    (["demo", "--max-documents", "2"], "got 2"),
    (["demo", "--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["demo", "--exclude", "*.py"], "--corpus"),
    (["dedup-against", "{tmp}/a", "{tmp}/b", "--threshold", "0"], "--threshold must be a number in (0, 1], got 0.0"),
    (["dedup-against", "{tmp}/a", "{tmp}/b"], "{tmp}/a"),
    (["tokenizer", "{tmp}/corpus", "--out", "{tmp}/t.model", "--vocab-size", "2"], "got 2"),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "corpus").mkdir()
    (root / "corpus" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    return root


@pytest.mark.parametrize("argv,expected", BAD, ids=[" ".join(a[:1] + a[5:]) or "(none)" for a, _ in BAD])
def test_bad_invocation_is_one_line(argv, expected, folder, capsys):
    argv = [a.replace("{tmp}", str(folder)) for a in argv]
    expected = expected.replace("{tmp}", str(folder))
    status = main(argv)
    err = capsys.readouterr().err
    verb = argv[0] if argv and argv[0] in ("train", "generate", "build-db", "evaluate", "neighbours", "query",
                                           "demo", "dedup-against", "tokenizer") else None
    assert status != 0
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(f"retro {verb}: error: " if verb else "retro: error: "), err
    assert expected in err and "Traceback" not in err, err


def test_error_lists_what_is_valid(capsys):
    main(["train", "--db", "d", "--out", "r", "--set", "no_such_field=1"])
    assert "valid fields: vocab_size, dim" in capsys.readouterr().err
    main(["train", "--db", "d", "--out", "r", "--config", "huge"])
    assert "tiny, 172M, 425M, 1.5B, 7.5B" in capsys.readouterr().err


def test_set_values_are_converted_to_the_field_types():
    overrides = parse_overrides(["dim=64", "cca_layers=1,3", "dropout=0", "qk_norm=true", "backend=cpu"])
    assert check_config_fields(overrides) == {"dim": 64, "cca_layers": (1, 3), "dropout": 0.0, "qk_norm": True,
                                              "backend": "cpu"}


@pytest.mark.parametrize("make", [
    lambda: TrainOptions(db="d", out="r", steps=0),
    lambda: TrainOptions(db="d", out="r", k=True),
    lambda: TrainOptions(db="d", out="r", overrides={"heads": "4"}),
    lambda: TrainOptions(db="d", out="r", config="huge"),
    lambda: SamplingOptions(top_p=0.0),
    lambda: SamplingOptions(temperature=float("inf")),
    lambda: BuildOptions(corpus=".", out="o", include="*.py"),  # a string, not a list of globs
    lambda: BuildOptions(corpus=".", out="o", max_documents=0),
    lambda: DemoOptions(valid_fraction=0.0),
])
def test_python_api_has_the_same_checks(make):
    with pytest.raises(RetroError):
        make().validate()


def test_a_retro_error_from_inside_a_command_is_one_line(folder, monkeypatch, capsys):
    """A RetroError raised deep in a command's work (not by argparse or validate) is still a user
    error: one line, status 2."""
    import retro.evaluation.dedup

    def refuse(*args, **kwargs):
        raise RetroError("the evaluation corpus 'e' holds no document")

    monkeypatch.setattr(retro.evaluation.dedup, "dedup_against", refuse)
    assert main(["dedup-against", "e", "t"]) == 2
    assert capsys.readouterr().err == "retro dedup-against: error: the evaluation corpus 'e' holds no document\n"


@pytest.mark.parametrize("error", [ValueError("an internal bug: shapes (2, 3) and (4,)"),
                                   TypeError("an internal bug: unsupported operand"),
                                   ZeroDivisionError("division by zero"),
                                   FileNotFoundError(2, "No such file or directory", "/internal/table.json")])
def test_an_internal_bug_shows_its_traceback_and_asks_for_a_report(error, monkeypatch, capsys):
    """Any exception other than RetroError (and argparse's errors) is a bug, not a user mistake:
    its traceback, naming the function that raised it, then a line asking to report it; status 1."""
    import retro.training.fsdp

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(retro.training.fsdp, "convert_checkpoint", broken)
    status = main(["convert-checkpoint", "run"])
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("Traceback (most recent call last):"), err
    assert "in broken" in err and f"{type(error).__name__}: " in err, err
    assert err.splitlines()[-1].startswith("retro convert-checkpoint: internal error") and "please report" in err
