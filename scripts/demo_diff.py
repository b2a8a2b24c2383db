"""Compares two `retro demo` summaries (summary.json) figure by figure, times left out: prints every
figure that differs and exits 1 if one does. Two runs of one demo command with --steps and --seed
give the same figures, except the baseline's, which trains for RETRO's measured time.

    python scripts/demo_diff.py runs/a/summary.json runs/b/summary.json [--ignore KEY ...]
"""
import argparse
import json
import sys

TIMES = {"seconds", "train_seconds", "step_seconds", "build_seconds"}


def flatten(value, path=()):
    """(path, leaf) of every leaf of a JSON value, the keys in TIMES left out."""
    if isinstance(value, dict):
        for key, v in value.items():
            if key not in TIMES:
                yield from flatten(v, (*path, key))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from flatten(v, (*path, str(i)))
    else:
        yield path, value


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--ignore", nargs="*", default=[], help="keys left out as well (e.g. generation)")
    args = p.parse_args()
    a, b = ({"/".join(k): v for k, v in flatten(json.load(open(f))) if not set(k) & set(args.ignore)}
            for f in (args.a, args.b))
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k, "(absent)") != b.get(k, "(absent)"))
    for k in differ:
        print(f"{k}: {a.get(k, '(absent)')!r} != {b.get(k, '(absent)')!r}")
    print(f"{len(a.keys() | b.keys()) - len(differ)} figures equal, {len(differ)} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
