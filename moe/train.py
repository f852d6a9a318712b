"""``python -m moe.train RECIPE [options]`` is ``moe train RECIPE [options]``: the module the DeepSpeed launcher runs.

    deepspeed --num_gpus 2 --module moe.train recipes/tiny.yaml parallel.expert_parallel_size=2

The training loop itself is ``moe.trainer``.
"""

import sys

from moe.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
