"""Write a Hugging Face model directory with random weights for a config + tokenizer directory.

For benchmarks on machines where the real weights cannot travel (the embedded GGUF is ~98 MB):
timings depend on shapes, not on weight values. Tokens from such a model are meaningless.

    python3 benchmarks/random_weights.py CONFIG_DIR OUT_DIR --dtype bfloat16 --device cuda
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ktinject.loading import DTYPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="directory with config.json and tokenizer files")
    parser.add_argument("target", type=Path)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--device", default="cpu", help="where to initialise (cuda is faster)")
    args = parser.parse_args()
    config = AutoConfig.from_pretrained(args.source)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[args.dtype])
    model.save_pretrained(args.target)
    for item in args.source.iterdir():
        if item.name != "config.json" and not (args.target / item.name).exists():
            shutil.copy(item, args.target / item.name)
    print(f"wrote {args.target} ({sum(p.numel() for p in model.parameters()):,} parameters)")


if __name__ == "__main__":
    main()
