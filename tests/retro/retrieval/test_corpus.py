"""Corpus directories: every regular text file is a document whatever its name (no NUL byte in
its first 8 KiB), binary files are skipped and counted, --include/--exclude globs select files,
and a corpus with nothing usable says how many files were found and why each was skipped."""
import gzip
import json

import pytest

from retro import RetroError
from retro.app.cli import main
from retro.retrieval.corpus import BLOCK, CorpusReport, iter_documents, read_documents

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"


def write(root, files: dict):
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return root


def test_files_without_a_known_suffix_are_read(tmp_path):
    write(tmp_path, {"LICENSE": "Apache License", "README": "read me", "COPYING": "GPL text", "man/ls.1": ".TH LS 1",
                     "bin/tool": "#!/bin/sh\necho hi", "notes.txt": "notes"})
    report = CorpusReport()
    docs = list(iter_documents(tmp_path, report=report))
    assert docs == ["GPL text", "Apache License", "read me", "#!/bin/sh\necho hi", ".TH LS 1", "notes"]  # sorted paths
    assert report.found == report.files == 6 and report.skipped["binary"] == 0


def test_binary_files_are_skipped_and_counted(tmp_path):
    late_nul = b"x" * BLOCK + b"\x00 after the first block"
    write(tmp_path, {"image.png": PNG, "data.bin": b"\x00\x01\x02", "latin1.txt": b"caf\xe9", "late": late_nul})
    report = CorpusReport()
    docs = list(iter_documents(tmp_path, report=report))
    assert docs == [late_nul.decode(), "caf\ufffd"]  # non-UTF-8 bytes are replaced, not a reason to skip
    assert report.skipped == {"binary": 2, "excluded": 0, "not_included": 0} and report.replaced_bytes == 1
    assert sorted(p.rsplit("/", 1)[-1] for p in report.skipped_files) == ["data.bin", "image.png"]
    assert report.found == 4 and report.files == 2


def test_include_and_exclude_globs(tmp_path):
    write(tmp_path, {"a.md": "top", "docs/b.md": "nested", "docs/c.txt": "text", "LICENSE": "license",
                     ".git/config": "[core]", "src/x.py": "x = 1"})

    def read(include=(), exclude=()):
        report = CorpusReport()
        return list(iter_documents(tmp_path, report=report, include=include, exclude=exclude)), report

    docs, report = read(include=["*.md"])  # no "/": matches the file name in any folder
    assert docs == ["top", "nested"] and report.skipped["not_included"] == 4
    assert read(include=["docs/*"])[0] == ["nested", "text"]
    docs, report = read(exclude=[".git/*", "LICENSE"])
    assert docs == ["top", "nested", "text", "x = 1"] and report.skipped["excluded"] == 2
    assert read(include=["*.md", "*.py"], exclude=["docs/*"])[0] == ["top", "x = 1"]


def test_jsonl_files_in_a_directory_are_one_document_per_line(tmp_path):
    write(tmp_path, {"a.jsonl": json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n"})
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "zipped"}) + "\n")
    assert list(iter_documents(tmp_path)) == ["one", "two", "zipped"]


def test_nothing_usable_says_how_many_files_and_why(tmp_path):
    write(tmp_path, {"image.png": PNG, "empty.txt": " \n", "skip.log": "log", "other.rst": "text"})
    with pytest.raises(RetroError) as err:
        read_documents(tmp_path, include=["*.png", "*.txt", "*.log"], exclude=["*.log"])
    assert str(err.value).endswith("4 files found, 0 non-empty documents; skipped: 1 binary, 1 empty, "
                                   "1 excluded by --exclude, 1 not matching --include")


def test_build_db_passes_the_globs(tmp_path, capsys):
    write(tmp_path / "corpus", {"a.txt": "text", "b.txt": "more"})
    status = main(["build-db", str(tmp_path / "corpus"), "--out", str(tmp_path / "db"), "--exclude", "a.*",
                   "--exclude", "b.*"])
    assert status == 2 and "2 excluded by --exclude" in capsys.readouterr().err
    assert not (tmp_path / "db").exists()  # nothing usable: no folder left behind
