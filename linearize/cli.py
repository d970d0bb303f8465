"""The `linearize` command: convert, generate, prefill, serve, eval, bench, serve-bench, report, compare, blocks,
cache-score.

Every user error is one line on stderr and a non-zero exit code, never a traceback."""

import argparse
import sys

from .bench import cli as bench_cli
from .compare import cli as compare_cli
from .convert import cli as convert_cli
from .errors import LinearizeError
from .evaluate import cli as evaluate_cli
from .generate import cli as generate_cli
from .report import cli as report_cli
from .serve import cli as serve_cli
from .serve import load_test
from .transfer import cache_score
from .transfer import cli as blocks_cli
from .transfer import speed as transfer_speed


def _quiet_libraries():
    """--no-progress: no bars from transformers either (loading weights, GGUF de-quantisation: loading/teacher.py)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


COMMANDS = [convert_cli.add, generate_cli.add, serve_cli.add, evaluate_cli.add, bench_cli.add, load_test.add,
            transfer_speed.add, report_cli.add, compare_cli.add, blocks_cli.add, cache_score.add]


ON_INTERRUPT = {  # what an interrupted command kept, for those that keep anything
    "convert": "finished work is checkpointed, continue with the same command plus --resume",
    "compare": "finished conversions are kept, the same command continues the rest",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="linearize", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if getattr(args, "no_progress", False):
            _quiet_libraries()
        import torch

        torch.set_flush_denormal(True)  # trained feature maps make subnormal floats, which are very slow on CPU
        args.run(args)
    except LinearizeError as e:
        print(f"linearize: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nlinearize: interrupted; {ON_INTERRUPT.get(args.command, 'nothing was saved')}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
