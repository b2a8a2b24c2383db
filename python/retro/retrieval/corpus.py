"""Reading a corpus into documents: a text file (one document), a directory (each text file one
document), or .jsonl / .jsonl.gz (one document per line, field `text` by default; also inside a
directory).

In a directory every regular file is read whatever its name or suffix (LICENSE, README, man
pages...) if it is text: no NUL byte in its first 8 KiB (the rule git uses). Binary files are
skipped and counted. `include` / `exclude` globs select files by their path relative to the
directory; a pattern without "/" also matches the file name in any folder. Bytes that are not
UTF-8 are replaced (U+FFFD) and counted, never a crash."""
from __future__ import annotations

import codecs
import fnmatch
import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from ..base.errors import RetroError

BLOCK = 8192  # bytes sniffed for a NUL: a file with one is binary
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
# why a file found is not read, as the report words it
SKIP_REASONS = {"binary": "binary", "excluded": "excluded by --exclude", "not_included": "not matching --include"}


@dataclass
class CorpusReport:
    found: int = 0                  # regular files found (1 for a single-file corpus)
    files: int = 0                  # files read (text and .jsonl files)
    documents: int = 0
    empty_documents: int = 0
    bytes: int = 0
    replaced_bytes: int = 0         # bytes that were not UTF-8
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    skipped_files: list[str] = field(default_factory=list)  # their paths

    def skip(self, path: Path, reason: str) -> None:
        self.skipped[reason] += 1
        self.skipped_files.append(str(path))

    def describe(self) -> str:
        """'5 files found, 1 non-empty document; skipped: 2 binary, 1 empty, 1 excluded by
        --exclude, 0 not matching --include'."""
        skipped = [f"{self.skipped[key]} {words}" for key, words in SKIP_REASONS.items()]
        skipped.insert(1, f"{self.empty_documents} empty")
        return f"{self.found} files found, {self.documents} non-empty documents; skipped: {', '.join(skipped)}"


def check_globs(include: Iterable[str], exclude: Iterable[str]) -> None:
    """RetroError unless include and exclude are lists of non-empty glob strings."""
    for name, globs in (("--include", include), ("--exclude", exclude)):
        if isinstance(globs, str) or not all(isinstance(g, str) and g for g in globs):
            raise RetroError(f"{name} takes a list of non-empty glob patterns, got {globs!r}")


def check_corpus(corpus: str | Path) -> Path:
    """The corpus path; RetroError if it does not exist."""
    path = Path(corpus)
    if not path.exists():
        raise RetroError(f"corpus {str(corpus)!r} does not exist; expected a text file, a directory of text files "
                         "or a .jsonl/.jsonl.gz file")
    return path


def _matches(relative: str, globs: Iterable[str]) -> bool:
    """Whether the relative path matches a glob (one without "/" may match the file name alone)."""
    name = relative.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(relative, g) or ("/" not in g and fnmatch.fnmatchcase(name, g)) for g in globs)


def _decode(raw: bytes, report: CorpusReport) -> str:
    """UTF-8 decode; each undecodable byte sequence becomes U+FFFD and its bytes are counted."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    bad = 0

    def replace(exc: UnicodeDecodeError):
        nonlocal bad
        bad += exc.end - exc.start
        return "\ufffd", exc.end

    codecs.register_error("retro_count_replace", replace)
    text = raw.decode("utf-8", errors="retro_count_replace")
    report.replaced_bytes += bad
    return text


def _jsonl_lines(path: Path) -> Iterator[bytes]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        yield from f


def _select(path: Path, include, exclude, report: CorpusReport) -> list[Path]:
    """The files of the corpus that the globs let through, sorted; the others are counted."""
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file())
        relative = [p.relative_to(path).as_posix() for p in found]
    else:
        found, relative = [path], [path.name]
    report.found += len(found)
    kept = []
    for f, rel in zip(found, relative):
        if include and not _matches(rel, include):
            report.skip(f, "not_included")
        elif _matches(rel, exclude):
            report.skip(f, "excluded")
        else:
            kept.append(f)
    return kept


def _jsonl_documents(f: Path, rel: str, text_field: str, report: CorpusReport) -> Iterator[tuple[str, str, str]]:
    """(text, folder, source) of each record: the folder of its "path" field if it has one, else a folder of
    its own (the file and line), so that a folder hold-out then holds out single records."""
    for n, line in enumerate(_jsonl_lines(f), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(_decode(line, report))
        except json.JSONDecodeError as exc:
            raise RetroError(f"{f}: line {n} is not JSON ({exc.msg}); expected one JSON object per line") from exc
        if not isinstance(record, dict) or text_field not in record:
            raise RetroError(f"{f}: line {n} has no field {text_field!r} (fields: "
                             f"{sorted(record) if isinstance(record, dict) else type(record).__name__}); "
                             "choose the field with --text-field")
        path = record.get("path")
        folder = path.rsplit("/", 1)[0] if isinstance(path, str) and "/" in path else \
            "" if isinstance(path, str) else f"{rel}#{n}"
        yield from _count(str(record[text_field]), report, folder, path if isinstance(path, str) else f"{rel}#{n}")


def _text_document(f: Path, folder: str, report: CorpusReport, rel: str) -> Iterator[tuple[str, str, str]]:
    """The file's text, or nothing (counted as binary) if its first block holds a NUL byte."""
    with open(f, "rb") as fh:
        head = fh.read(BLOCK)
        if b"\0" in head:
            report.skip(f, "binary")
            return
        raw = head + fh.read()
    report.files += 1
    report.bytes += len(raw)
    yield from _count(_decode(raw, report), report, folder, rel)


def iter_documents(corpus: str | Path, text_field: str = "text", report: CorpusReport | None = None,
                   include: Iterable[str] = (), exclude: Iterable[str] = (), with_folder: bool = False,
                   with_source: bool = False):
    """Yields the text of every non-empty document of `corpus`, in a stable order (sorted paths),
    or with_folder=True (text, folder): the folder of the file relative to the corpus (a .jsonl
    record: the folder of its "path" field), or with_source=True (text, folder, source): also the
    file's path relative to the corpus (a .jsonl record: its "path" field, else FILE#LINE).
    include: globs a file must match (none: every file); exclude: globs of files left out.
    Streams: one file is in memory at a time."""
    report = report if report is not None else CorpusReport()
    check_globs(include, exclude)
    path = check_corpus(corpus)
    root = path if path.is_dir() else path.parent
    for f in _select(path, tuple(include), tuple(exclude), report):
        rel = f.relative_to(root).as_posix()
        try:
            if f.name.endswith(JSONL_SUFFIXES):
                report.files += 1
                docs = _jsonl_documents(f, rel, text_field, report)
            else:
                docs = _text_document(f, rel.rsplit("/", 1)[0] if "/" in rel else "", report, rel)
            for text, folder, source in docs:
                yield (text, folder, source) if with_source else (text, folder) if with_folder else text
        except OSError as exc:
            raise RetroError(f"cannot read corpus file {str(f)!r}: {exc.strerror or exc}") from exc


def read_documents(corpus: str | Path, text_field: str = "text", report: CorpusReport | None = None,
                   include: Iterable[str] = (), exclude: Iterable[str] = ()) -> list[str]:
    """iter_documents as a list; RetroError saying how many files were found and why each kind
    was skipped when no non-empty document remains."""
    report = report if report is not None else CorpusReport()
    documents = list(iter_documents(corpus, text_field, report, include, exclude))
    if not documents:
        raise RetroError(f"corpus {str(corpus)!r} has no non-empty document: {report.describe()}")
    return documents


def _count(text: str, report: CorpusReport, folder: str, source: str) -> Iterator[tuple[str, str, str]]:
    if text.strip():
        report.documents += 1
        yield text, folder, source
    else:
        report.empty_documents += 1
