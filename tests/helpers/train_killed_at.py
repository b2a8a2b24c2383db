"""`python tests/helpers/train_killed_at.py STEP ARGS...`: `retro train ARGS` in this process, killed with
SIGKILL just before optimizer step STEP (0-based) runs, as an out-of-memory kill or a lost node
would: no exception handler, no cleanup. The tests resume what it leaves behind."""
import os
import signal
import sys

from retro.app.cli import build_parser, parse_overrides
from retro.base.options import options_from_args
from retro.training.train import TrainOptions, train
from retro.base import hooks


def main(argv: list[str]) -> None:
    kill_at = int(argv[0])
    args = build_parser().parse_args(["train", *argv[1:]])
    opts = options_from_args(TrainOptions, args, overrides=parse_overrides(args.set))

    def reached(stage: str, step: int = 0) -> None:
        if stage == "step" and step == kill_at:
            print(f"[train_killed_at] SIGKILL before step {step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    hooks.reached = reached
    train(opts)


if __name__ == "__main__":
    main(sys.argv[1:])
