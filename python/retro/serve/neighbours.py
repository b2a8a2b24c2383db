"""What a response says about retrieval: for each completed chunk, the neighbours it retrieved
(database chunk id, document, text) and the span of each neighbour's text that matches the chunk
(the longest run of words they share), which the page at / marks."""
from __future__ import annotations

import re
from difflib import SequenceMatcher


def match_span(query: str, text: str) -> list[int] | None:
    """[start, end): the characters of `text` covering the longest run of whole words it shares
    with `query`; None when they share no word."""
    words = [(w.group(), w.start(), w.end()) for w in re.finditer(r"\S+", text)]
    query_words = query.split()
    found = SequenceMatcher(None, query_words, [w for w, _, _ in words], autojunk=False).find_longest_match()
    if found.size == 0:
        return None
    return [words[found.b][1], words[found.b + found.size - 1][2]]


def describe_retrievals(db, tokenizer, chunk_tokens: list, chunks: list[int], ids) -> list[dict]:
    """One entry per retrieval: chunk_tokens[j], the tokens of chunk chunks[j] of the sequence,
    retrieved the database chunk ids ids[j] (k,) (-1: none) ->
    {"chunk": u, "text": the chunk's text, "neighbours": [{"id", "document", "text", "match"}]}."""
    out = []
    for tokens, u, row in zip(chunk_tokens, chunks, ids):
        query = tokenizer.decode(list(tokens))
        neighbours = []
        for cid in (int(c) for c in row):
            if cid < 0:
                continue
            text = db.chunk_text(cid)
            neighbours.append({"id": cid, "document": int(db.chunk_doc[cid]), "text": text,
                               "match": match_span(query, text)})
        out.append({"chunk": int(u), "text": query, "neighbours": neighbours})
    return out
