"""Process groups, the expert-parallel all-to-all dispatcher and the DeepSpeed wiring.

This is the only package that touches ``torch.distributed`` and the only one that imports DeepSpeed; process
groups are always passed in, never looked up from a global. Its contents land with the expert-parallelism
issue; until then every model runs on one process.
"""
