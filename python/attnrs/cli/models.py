"""``python -m attnrs models``: every transformers family with ``attn_implementation="attnrs"`` against eager
(:mod:`attnrs.integrations.transformers.families`), printed as a table; ``--markdown`` writes the README's list."""

from __future__ import annotations

import argparse
import collections
import platform

import torch

from ..integrations.transformers.families import Result, check_family, families
from .progress import echo, progress

__all__ = ["add_parser", "run_models"]


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    models = sub.add_parser("models", help='every transformers family with attn_implementation="attnrs" vs eager')
    models.add_argument("families", nargs="*", help="model types to check (default: all)")
    models.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    models.add_argument("--markdown", action="store_true", help="print a Markdown table (the README's list)")
    models.set_defaults(func=run_models)


def run_models(args: argparse.Namespace) -> int:
    import transformers

    dtype = getattr(torch, args.dtype)
    wanted = set(args.families)
    chosen = [f for f in families() if not wanted or f.model_type in wanted]
    print(
        f"transformers {transformers.__version__}, torch {torch.__version__}, {platform.processor() or 'CPU'}, "
        f"{args.dtype}: {len(chosen)} (family, task) pairs",
        flush=True,
    )
    results: list[Result] = []
    bar = progress(chosen, "models", unit="model")
    for family in bar:
        bar.note(family.model_type)
        result = check_family(family, dtype)
        results.append(result)
        features = ",".join(result.features) or "-"
        if args.markdown:
            echo(f"| {family.model_type} | {family.task} | {result.status} | {features} | {result.detail} |")
        else:
            echo(f"{family.task:8} {family.model_type:30} {result.status:11} {features:30} {result.detail}")
    counts = collections.Counter(r.status for r in results)
    echo(", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    return 1 if counts.get("fail") else 0
