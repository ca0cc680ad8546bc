"""The ``lrfree`` command line (also ``python -m lrfree``).

    lrfree [train]            train a small character-level GPT with learning-rate-free optimizers (default)
    lrfree reproduce quartic  the Inexact Polyak paper's (L0, L1)-smooth quartic
    lrfree reproduce lrfree   learning-rate-free methods vs swept SGD/Adam on embedded data

Bad input (an unknown optimizer, an impossible size, a missing CUDA device) is one line on stderr and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .experiments.output import Output, UsageError, resolve_device

TRAIN_DEFAULT = "PSDASGD,InexactPolyak,Prodigy,DAdaptAdam,AdamW"


def _l1_list(text: str) -> tuple[float, ...]:
    """--l1: the values of L1 the paper tuned GD and clipped GD for (its Table 3), which the comparison needs."""
    from .experiments.quartic import L1_VALUES
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    allowed = ", ".join(f"{v:g}" for v in L1_VALUES)
    if not values:
        raise argparse.ArgumentTypeError(f"no L1 value given; choose from {allowed}")
    others = [v for v in values if v not in L1_VALUES]
    if others:
        raise argparse.ArgumentTypeError(
            f"L1 = {', '.join(f'{v:g}' for v in others)} is not one of {allowed}: GD and clipped GD are run at the "
            "paper's settings tuned per L1 (its Table 3), which exist for these values only")
    return values


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help shows its default, except where there is none to show (None, a flag's False) or
    the help text states it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default is None or action.default is False or "default" in help_text:
            return help_text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from .experiments.optimizers import CONTENDERS
    parser = argparse.ArgumentParser(prog="lrfree", description=__doc__.split("\n\n")[0],
                                     formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{train,reproduce}")

    train = sub.add_parser("train", help="train a character-level GPT on embedded text (the default)",
                           formatter_class=_HelpFormatter,
                           description="Train a character-level GPT on CPython's pydoc topics (no download) with "
                                       "each optimizer, from the same seed and batches.")
    train.add_argument("--optimizers", default=TRAIN_DEFAULT,
                       help=f"comma-separated, from: {', '.join(CONTENDERS)} (GLyDER: around lrfree.Adam with the "
                            "GNB curvature; GLyDER-split: with gradient='split'); NAME:bf16 for lrfree's NAME with "
                            "its state in bf16 (state_dtype=torch.bfloat16)")
    train.add_argument("--adamw-lr", type=float, default=3e-3, help="the fixed lr of the baselines that take one "
                                                                    "(AdamW, Adam, SGD)")
    train.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    train.add_argument("--width", type=int, default=128, help="model width (embedding size)")
    train.add_argument("--layers", type=int, default=2, help="transformer blocks")
    train.add_argument("--heads", type=int, default=4, help="attention heads (must divide --width)")
    train.add_argument("--context", type=int, default=64, help="characters per sequence")
    train.add_argument("--batch", type=int, default=32, help="sequences per batch")
    train.add_argument("--seed", type=int, default=0, help="seed of the model and of the batches")
    train.add_argument("--device", default="cpu", help="cpu or cuda")
    train.add_argument("--out", default="lrfree-results/train", help="output folder")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")

    reproduce = sub.add_parser("reproduce", help="reproduce a paper's claim at small scale",
                               formatter_class=_HelpFormatter)
    which = reproduce.add_subparsers(dest="experiment", metavar="{quartic,lrfree}", required=True)
    quartic = which.add_parser("quartic", help="Inexact Polyak on the (L0, L1)-smooth quartic",
                               formatter_class=_HelpFormatter)
    quartic.add_argument("--steps", type=int, default=1000, help="steps, also Inexact Polyak's horizon T")
    quartic.add_argument("--l1", type=_l1_list, default="1,10,100,1000",
                         help="comma-separated L1 values, each one of 1, 10, 100, 1000: GD and clipped GD use the "
                              "paper's per-L1 tuned settings (its Table 3), which exist for these only")
    quartic.add_argument("--out", default="lrfree-results/quartic", help="output folder")

    lrfree_ = which.add_parser("lrfree", help="learning-rate-free methods vs swept SGD and Adam",
                               formatter_class=_HelpFormatter)
    lrfree_.add_argument("--tasks", default="digits,chargpt", help="comma-separated: digits, digits-cnn, chargpt")
    from .experiments.paper_lrfree import DEFAULT_METHODS
    lrfree_.add_argument("--methods", default=DEFAULT_METHODS,
                         help=f"comma-separated, from: {', '.join(CONTENDERS)}; AdamW, Adam and SGD get an lr sweep; "
                              "NAME:bf16 for lrfree's NAME with its state in bf16 (state_dtype=torch.bfloat16)")
    lrfree_.add_argument("--seeds", type=int, default=3, help="seeds per method (mean ± std)")
    lrfree_.add_argument("--steps", type=int, default=None,
                         help="steps per run (default: 500 digits and digits-cnn, 300 chargpt)")
    lrfree_.add_argument("--device", default="cpu", help="cpu or cuda")
    lrfree_.add_argument("--out", default="lrfree-results/lrfree", help="output folder")
    lrfree_.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run(args: argparse.Namespace) -> None:
    from .experiments import optimizers
    if args.command == "train":
        from .experiments import chargpt
        size = chargpt.ModelSize(args.width, args.layers, args.heads, args.context, args.batch)
        if args.steps < 1:
            raise UsageError(f"--steps must be at least 1, got {args.steps}")
        if not args.adamw_lr > 0:
            raise UsageError(f"--adamw-lr must be positive, got {args.adamw_lr}")
        chargpt.run_train(optimizers.parse_names(args.optimizers), args.steps, size, args.seed,
                          resolve_device(args.device), args.adamw_lr, Output(args.out), not args.no_progress)
    elif args.experiment == "quartic":
        from .experiments import quartic
        quartic.run_quartic(args.steps, args.l1, Output(args.out))
    else:
        from .experiments import paper_lrfree
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        paper_lrfree.run_lrfree(tasks, args.methods, args.seeds, args.steps, resolve_device(args.device),
                                Output(args.out), not args.no_progress)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "train")  # the main job is the default command
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except UsageError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
