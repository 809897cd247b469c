"""`python -m ktinject.bench ...` is `ktinject bench ...` (handy where the CLI is not installed)."""

import argparse
import sys

from ktinject.bench import add_bench_arguments, run_bench
from ktinject.errors import KtinjectError

parser = argparse.ArgumentParser(prog="python -m ktinject.bench", description=__doc__)
add_bench_arguments(parser)
try:
    sys.exit(run_bench(parser.parse_args()))
except KtinjectError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
