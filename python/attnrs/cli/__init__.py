"""``python -m attnrs`` / ``attnrs``: the argument parser and the ``info`` and ``show-mask`` commands; ``demo``
(:mod:`~attnrs.cli.demo`) and ``bench`` (:mod:`~attnrs.cli.bench`) have their own modules, and the pictures of
``show-mask`` come from :mod:`~attnrs.cli.drawing`."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Sequence

import torch

import attnrs

from .. import masks
from ..attention.dispatch import flash_attn_available, render_routes
from ..errors import AttnrsError
from ..masks.block_mask import create_block_mask
from ..precision import f32_matmul_precision
from .bench import main as bench_main
from .demo import DTYPES, FAMILIES, run_demo
from .drawing import draw_block_layout, draw_mask, write_png
from .models import add_parser as add_models_parser
from .plots import PlotError, check_output, require_matplotlib


def _precision_note() -> str:
    """What torch.set_float32_matmul_precision("medium") and ("high") make float32 calls run on here."""
    try:
        bf16_path = attnrs.kernel_path("bfloat16")[0]
    except AttnrsError:
        return "the bf16 path is refused here"
    if bf16_path not in ("amx", "amx_emulated", "avx512_bf16"):
        return '"medium" and "high" stay exact float32 here: this path has no fast bf16 products'
    medium = f'"medium" runs float32 inputs rounded to bf16 on {bf16_path}'
    if bf16_path == "avx512_bf16":
        return f'{medium}; "high" stays exact float32 (no bf16x3 on avx512_bf16)'
    return f'{medium}; "high" runs them as bf16x3 on {bf16_path} tiles'


def _cmd_info(args: argparse.Namespace) -> int:
    attnrs.load_plugins()  # so that their attention functions are listed too
    print(f"attnrs {attnrs.__version__} (torch {torch.__version__}, python {platform.python_version()})")
    print(f"cpu: {platform.machine()}, features: {', '.join(attnrs.cpu_features()) or 'none'}")
    print(f"simd path: {attnrs.simd_path()}")
    forced = os.environ.get("ATTNRS_ISA", "").strip()
    print(f"cpu kernel path per dtype (forward, backward and decode){f'; ATTNRS_ISA={forced}' if forced else ''}:")
    for dtype in ("float32", "bfloat16", "float16", "float64"):
        try:
            path, why = attnrs.kernel_path(dtype)
        except AttnrsError as e:  # an invalid ATTNRS_ISA, or a path this CPU lacks: every call would refuse it
            path, why = "refused", str(e)
        print(f"  {dtype:<9} {path:<12} {why}")
    print(f"float32 matmul precision: {f32_matmul_precision()} ({_precision_note()})")
    print(f"threads: {attnrs.num_threads()} (ATTNRS_NUM_THREADS overrides torch.get_num_threads())")
    print('backend="auto" (attnrs.attention.dispatch; the first row that holds wins):')
    for line in render_routes().splitlines():
        print(f"  {line}")
    where = "importable" if flash_attn_available() else "not installed"
    print(f"  here: CUDA {'available' if torch.cuda.is_available() else 'not available'}, flash-attn {where}")
    for title, interface in (
        ("attention functions", attnrs.ALL_ATTENTION_FUNCTIONS),
        ("mask builders", attnrs.ALL_MASK_ATTENTION_FUNCTIONS),
    ):
        print(f"{title}:")
        for name in interface:
            caps = interface.capabilities(name)
            fn = interface[name]
            where = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
            print(f"  {name:<18} {where}")
            if caps:
                shown = ", ".join(f"{k}={v}" for k, v in caps.items() if v not in ([], None))
                print(f"  {'':<18} {shown}")
    print("native kernels (attnrs.register_native, plugins of the 'attnrs.kernels' entry-point group):")
    for name, info in attnrs.native_kernels().items():
        print(f"  {name:<18} {info['origin']}")
        shown = ", ".join(f"{k}={v}" for k, v in info.items() if k != "origin" and v not in ([], None))
        print(f"  {'':<18} {shown}")
    for name, reason in attnrs.plugin_errors().items():
        print(f"  {name:<18} failed to load: {reason}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """A small embedded model with attn_implementation="attnrs" against "sdpa": parity and speed."""
    return run_demo(
        family=args.family,
        length=args.length,
        batch=args.batch,
        new_tokens=args.new_tokens,
        dtype=args.dtype,
        repeats=args.repeats,
    )


def _cmd_show_mask(args: argparse.Namespace) -> int:
    """Draws a mask written as an expression of attnrs.masks constructors, and its block layout."""
    namespace = {name: getattr(masks, name) for name in masks.__all__}
    namespace["sliding_window_overlay"] = masks.sliding_window_overlay
    namespace["torch"] = torch
    try:
        # The expression is the user's own command-line input, evaluated like `python -c` would.
        mask = masks.from_callable(eval(args.mask, {"__builtins__": {}}, namespace))
    except Exception as e:
        print(f"show-mask: cannot build {args.mask!r}: {e}", file=sys.stderr)
        return 2
    if args.png:
        try:
            check_output(args.png, "--png")
            require_matplotlib("--png")
        except PlotError as e:
            print(f"show-mask: {e}", file=sys.stderr)
            return 2
    kv_len = args.kv_length or args.length
    print(f"{mask!r}  Q={args.length} K={kv_len} q_offset={args.q_offset} kv_offset={args.kv_offset}")
    if max(args.length, kv_len) <= 128:
        print(draw_mask(mask, args.length, kv_len, q_offset=args.q_offset, kv_offset=args.kv_offset))
    block_mask = create_block_mask(
        mask, 1, None, args.length, kv_len, BLOCK_SIZE=args.block, q_offset=args.q_offset, kv_offset=args.kv_offset
    )
    if block_mask.kv_num_blocks.shape[-1] <= 128:
        print(draw_block_layout(block_mask))
    if args.png:
        height, width = write_png(
            args.png, mask, args.length, kv_len, block=args.block, q_offset=args.q_offset, kv_offset=args.kv_offset
        )
        print(f"wrote {args.png} ({width}x{height})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnrs", description="attnrs: pluggable, fast attention for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, CPU features, threads and registered functions").set_defaults(func=_cmd_info)
    demo = sub.add_parser(
        "demo", help='a small model with attn_implementation="attnrs" vs "sdpa" and "eager": speed, memory, parity'
    )
    demo.add_argument("--family", default="mistral", choices=sorted(FAMILIES), help="model family (default mistral)")
    demo.add_argument("--length", type=int, default=2048, help="prompt length (default 2048)")
    demo.add_argument("--batch", type=int, default=2, help="batch size, rows left-padded (default 2)")
    demo.add_argument("--new-tokens", type=int, default=16, help="tokens to generate greedily (default 16)")
    demo.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="auto (default): bfloat16 where this CPU computes bf16 fast (AVX-512 BF16, AMX), else float32",
    )
    demo.add_argument(
        "--repeats", type=int, default=2, help="timed generates of sdpa and attnrs, alternating (default 2; eager: 1)"
    )
    demo.set_defaults(func=_cmd_demo)
    add_models_parser(sub)
    sub.add_parser("bench", help="attention benchmarks against SDPA, transformers and flex (see bench --help)")
    show = sub.add_parser(
        "show-mask",
        help="draw a mask and its block layout",
        description="Draw a mask given as an expression of attnrs.masks constructors, "
        'e.g. "sliding_window(4) & causal()" or "document([0,0,0,1,1,1]) & causal()".',
    )
    show.add_argument("mask", nargs="?", default="causal()", help="mask expression (default: causal())")
    show.add_argument("--length", type=int, default=16, help="query length (default 16)")
    show.add_argument("--kv-length", type=int, default=None, help="key length (default: the query length)")
    show.add_argument("--q-offset", type=int, default=0, help="absolute position of the first query")
    show.add_argument("--kv-offset", type=int, default=0, help="absolute position of the first key")
    show.add_argument("--block", type=int, default=4, help="block size of the layout drawing (default 4)")
    show.add_argument(
        "--png",
        default=None,
        metavar="FILE",
        help="also draw the mask into FILE (.png or .svg): axes, --block boundaries, a legend; needs matplotlib",
    )
    show.set_defaults(func=_cmd_show_mask)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the benchmark has its own flags (python -m attnrs bench --help)
        bench_main(argv[1:])
        return 0
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
