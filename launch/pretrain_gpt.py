#!/usr/bin/env python
"""Pretrain a Megatron-style GPT: `python|torchrun|deepspeed launch/pretrain_gpt.py --config FILE [key=value ...]`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.train.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], "gpt"))
