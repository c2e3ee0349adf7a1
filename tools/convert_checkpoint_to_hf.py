#!/usr/bin/env python
"""Export a megatron_unihetero checkpoint (any TP/PP) to a transformers Llava folder.

    python tools/convert_checkpoint_to_hf.py --load runs/x/checkpoints --save hf/x [--iteration 100]
        [--dtype fp32|bf16] [--tokenizer PATH]

The folder loads with LlavaForConditionalGeneration.from_pretrained / AutoProcessor.from_pretrained;
the generation heads are in unihetero_heads.* (megatron_unihetero.hf.heads.load_unihetero_heads).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_unihetero.checkpointing.errors import CheckpointError  # noqa: E402
from megatron_unihetero.config_io import ConfigLoadError  # noqa: E402
from megatron_unihetero.hf import ConversionError, export_checkpoint  # noqa: E402
from megatron_unihetero.models.config import ConfigError  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint folder (holds `latest` and iter_*/)")
    p.add_argument("--save", required=True, help="new output folder (must not exist or be empty)")
    p.add_argument("--iteration", type=int, default=None, help="iteration to export (default: latest)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--tokenizer", default=None, help="override the run config's data.tokenizer")
    args = p.parse_args(argv)
    try:
        export_checkpoint(args.load, args.save, iteration=args.iteration, dtype=args.dtype,
                          tokenizer=args.tokenizer)
    except (ConversionError, ConfigError, ConfigLoadError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
