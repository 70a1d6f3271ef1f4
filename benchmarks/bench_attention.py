"""attnrs.attention against torch SDPA, transformers' paths and compiled flex. See attnrs/cli/bench.py for flags:

    python benchmarks/bench_attention.py [--quick] [--backward] [--threads N]
"""

import sys

from attnrs.cli.bench import main

if __name__ == "__main__":
    main(sys.argv[1:])
