"""The demo's last stage: a held-out file continued with retrieval, and the neighbours it read."""
from __future__ import annotations


def held_out_prompt(db, held: dict, past_header: bool) -> str:
    """The start of the first held-out file (the strict split's if it has one); past_header: of the
    first one that defines a class or a function, from that line, past a licence or a generated
    file's banner."""
    order = [int(d) for d in held["folder"]] + [int(d) for d in held["file"]]
    if past_header:
        for d in order:  # the first held-out file that defines a class or a function
            text = db.tokenizer.decode(db.document_tokens(d))
            starts = [i for i in (text.find("\nclass "), text.find("\ndef ")) if i >= 0]
            if starts:
                return text[min(starts) + 1:][:400].rsplit("\n", 1)[0]
    return db.tokenizer.decode(db.document_tokens(order[0])[:130])


def continue_held_out(model, retriever, held: dict, prompt: str | None, max_new_tokens: int, seed: int, log,
                      shown: int = 2, past_header: bool = False, **sampling):
    """Continues `prompt` (None: held_out_prompt's) with retrieval, logs the prompt, the continuation
    and the neighbours of the last `shown` retrievals; returns the Generation."""
    from retro.generate import generate

    prompt = prompt if prompt is not None else held_out_prompt(retriever.db, held, past_header)
    g = generate(model, retriever, [prompt], max_new_tokens=max_new_tokens, temperature=0.7, top_k=40,
                 top_p=0.95, seed=seed, **sampling)[0]
    log("=" * 70 + f"\nPROMPT:\n{prompt}\n" + "-" * 70 + f"\nCONTINUATION:\n{g.text}\n" + "-" * 70)
    for r in g.retrieved[-shown:]:
        for rank, text in enumerate(r["texts"]):
            snippet = (text or "(none)")[:300].replace("\n", "\n    ")
            log(f"retrieved for chunk {r['chunk']}, neighbour {rank} (chunk id {r['ids'][rank]}):\n    {snippet}")
    return g
