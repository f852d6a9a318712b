"""Hugging Face folders in and out: ``moe import`` (``import_hf``) and ``moe export`` (``export_hf``).

    config_map  config.json <-> ``ModelConfig``; which native layout a model matches (and why not)
    weights     reading weight files safely (safetensors; ``.bin`` only with ``weights_only``); name/layout mapping
    import_hf   HF folder -> run directory (our format: ``moe.rundir``); any model folder -> config and weights
    export_hf   run directory -> HF folder

Nothing here needs ``transformers``: configs are read and written as JSON, weights with ``safetensors``.
"""

from moe.hf.config_map import SUPPORTED_MODEL_TYPES, export_layout
from moe.hf.export_hf import export_hf
from moe.hf.import_hf import import_hf, read_hf_model

__all__ = ["SUPPORTED_MODEL_TYPES", "export_hf", "export_layout", "import_hf", "read_hf_model"]
