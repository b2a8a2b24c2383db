"""Reading a corpus into documents: a text file (one document), a directory of text files (each
file one document), or .jsonl / .jsonl.gz (one document per line, field `text` by default).
Bytes that are not UTF-8 are replaced (U+FFFD) and counted, never a crash."""
from __future__ import annotations

import codecs
import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import RetroError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".js", ".ts", ".java",
                 ".go", ".rs", ".rb", ".sh", ".toml", ".yaml", ".yml", ".cfg", ".ini", ".html", ".css", ".tex",
                 ".json", ".xml", ".csv", ".tsv", ".text", ".pyi", ".sql"}


@dataclass
class CorpusReport:
    files: int = 0
    documents: int = 0
    empty_documents: int = 0
    bytes: int = 0
    replaced_bytes: int = 0  # bytes that were not UTF-8
    skipped_files: list[str] = field(default_factory=list)


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


def iter_documents(corpus: str | Path, text_field: str = "text", report: CorpusReport | None = None,
                   suffixes=TEXT_SUFFIXES) -> Iterator[str]:
    """Yields the text of every non-empty document of `corpus`, in a stable order (sorted paths)."""
    report = report if report is not None else CorpusReport()
    path = Path(corpus)
    if not path.exists():
        raise RetroError(f"corpus {str(corpus)!r} does not exist; expected a text file, a directory of text files "
                         "or a .jsonl/.jsonl.gz file")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    else:
        files = [path]
    for f in files:
        report.files += 1
        is_jsonl = f.name.endswith(".jsonl") or f.name.endswith(".jsonl.gz")
        try:
            if is_jsonl:
                for n, line in enumerate(_jsonl_lines(f), 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(_decode(line, report))
                    except json.JSONDecodeError as exc:
                        raise RetroError(f"{f}: line {n} is not JSON ({exc.msg}); expected one JSON object per line")
                    if not isinstance(record, dict) or text_field not in record:
                        raise RetroError(f"{f}: line {n} has no field {text_field!r} (fields: "
                                         f"{sorted(record) if isinstance(record, dict) else type(record).__name__}); "
                                         "choose the field with --text-field")
                    yield from _count(str(record[text_field]), report)
            else:
                raw = f.read_bytes()
                report.bytes += len(raw)
                yield from _count(_decode(raw, report), report)
        except OSError as exc:
            raise RetroError(f"cannot read corpus file {str(f)!r}: {exc.strerror or exc}") from exc


def _count(text: str, report: CorpusReport) -> Iterator[str]:
    if text.strip():
        report.documents += 1
        yield text
    else:
        report.empty_documents += 1
