"""The demo's last stage: a held-out file continued with retrieval, and the neighbours it read."""
from __future__ import annotations

import re


PROMPT_CHARS = 400  # of the held-out file continued, cut at its last whole line


def past_header(text: str) -> str:
    """text from its first line of code: its leading comments, blank lines and docstring (a licence,
    a generated file's banner) left out."""
    while True:
        text = text.lstrip()
        if text.startswith("#"):
            text = text.partition("\n")[2]
        elif text[:3] in ('"""', "'''"):
            end = text.find(text[:3], 3)
            text = text[end + 3:] if end >= 0 else ""
        else:
            return text


def held_out_prompt(db, held: dict) -> str:
    """The code that the demo continues: the first held-out file (the strict split's first) that
    defines a class or a function, from that line; else the first with code past its header
    (past_header); its first PROMPT_CHARS characters, cut at a line's end."""
    order = [int(d) for d in held["folder"]] + [int(d) for d in held["file"]]
    texts = [db.tokenizer.decode(db.document_tokens(d)) for d in order]
    found = [m for m in (re.search(r"^(?:class|def) ", t, re.M) for t in texts) if m]
    code = found[0].string[found[0].start():] if found else next((c for c in map(past_header, texts) if c), texts[0])
    return code[:PROMPT_CHARS].rsplit("\n", 1)[0]


def continue_held_out(model, retriever, held: dict, prompt: str | None, max_new_tokens: int, seed: int, log,
                      shown: int = 2, **sampling):
    """Continues `prompt` (None: held_out_prompt's) with retrieval, logs the prompt, the continuation
    and the neighbours of the last `shown` retrievals; returns the Generation."""
    from retro.decoding.generate import generate

    prompt = prompt if prompt is not None else held_out_prompt(retriever.db, held)
    g = generate(model, retriever, [prompt], max_new_tokens=max_new_tokens, temperature=0.7, top_k=40,
                 top_p=0.95, seed=seed, **sampling)[0]
    log("=" * 70 + f"\nPROMPT:\n{prompt}\n" + "-" * 70 + f"\nCONTINUATION:\n{g.text}\n" + "-" * 70)
    for r in g.retrieved[-shown:]:
        for rank, text in enumerate(r["texts"]):
            snippet = (text or "(none)")[:300].replace("\n", "\n    ")
            log(f"retrieved for chunk {r['chunk']}, neighbour {rank} (chunk id {r['ids'][rank]}):\n    {snippet}")
    return g
