"""Hugging Face folders in and out: ``moe import`` (``import_hf``) and ``moe export`` (``export_hf``).

    config_import    config.json -> ``ModelConfig`` (the model types import reads)
    config_map       which layout a model exports as (native, remote code, refused) and the native config.json
    router_view      what each router computes at inference, in the terms export needs
    remote           the remote-code folder (``remote_code/``: the three files copied into it)
    tokenizer_files  tokenizer.json, tokenizer_config.json, generation_config.json of an export
    gguf_arch        which llama.cpp architecture expresses a model (and what none does)
    gguf_export      the GGUF file: hyper-parameters, tensors, the tokenizer
    weights          reading weight files safely (safetensors; ``.bin`` only with ``weights_only``); name/layout mapping
    import_hf        HF folder -> run directory (our format: ``moe.rundir``); any model folder -> config and weights
    export_hf        run directory -> HF folder or GGUF file

Nothing here needs ``transformers``: configs are read and written as JSON, weights with ``safetensors`` (GGUF
with the ``gguf`` package). The remote-code files are templates for ``transformers``, never imported here.
"""

from moe.hf.config_map import SUPPORTED_MODEL_TYPES, export_layout
from moe.hf.export_hf import export_hf
from moe.hf.import_hf import import_hf, read_hf_model

__all__ = ["SUPPORTED_MODEL_TYPES", "export_hf", "export_layout", "import_hf", "read_hf_model"]
