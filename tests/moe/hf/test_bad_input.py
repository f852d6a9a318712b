"""Bad Hugging Face folders and run directories end in one-line ``ValueError``s that name the file or the setting,
and a malicious pickle is refused without running anything."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from moe.cli import main
from moe.hf.export_hf import export_hf
from moe.hf.import_hf import import_hf
from tests.moe.hf.helpers import make_run, tiny_config
from tests.exploit import Exploit, plant

LLAMA = dict(model_type="llama", vocab_size=11, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, rms_norm_eps=1e-6,
             rope_theta=10000.0, hidden_act="silu")


def _folder(tmp_path, **config):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**LLAMA, **config}))
    return folder


def _import_error(folder, tmp_path) -> str:
    with pytest.raises(ValueError) as err:
        import_hf(folder, tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message
    return message


CONFIG_ERRORS = {
    "unsupported_model_type": ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'; supported model types: llama,"),
    "deepseek_v3_mla": ({"model_type": "deepseek_v3"}, "Multi-head Latent Attention (MLA)"),
    "sliding_window_in_use": ({"model_type": "mistral", "sliding_window": 16}, "sliding-window attention (window 16"),
    "qwen_sliding_window_on": ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8,
                                "max_window_layers": 0}, "sliding-window attention"),
    "rope_llama3": ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
                    "RoPE scaling 'llama3' is not implemented; supported: default"),
    "rope_scaling_legacy": ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE scaling 'linear'"),
    "gelu": ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    "mlp_bias": ({"mlp_bias": True}, "mlp_bias is not supported"),
    "missing_field": ({"hidden_size": None}, "config.json has no 'hidden_size'"),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_unsupported_configs_are_refused_in_one_line(case, tmp_path):
    config, message = CONFIG_ERRORS[case]
    folder = _folder(tmp_path, **config)
    error = _import_error(folder, tmp_path)
    assert message in error and str(folder / "config.json") in error
    assert not (tmp_path / "out").exists()


def test_missing_config_and_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "config.json: does not exist" in _import_error(tmp_path / "empty", tmp_path)
    folder = _folder(tmp_path)
    assert "no weights (expected model.safetensors" in _import_error(folder, tmp_path)


def test_missing_shard_names_the_file(tmp_path):
    folder = _folder(tmp_path)
    save_file({"model.norm.weight": torch.ones(8)}, str(folder / "model-00001-of-00002.safetensors"))
    index = {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors",
                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    error = _import_error(folder, tmp_path)
    assert str(folder / "model-00002-of-00002.safetensors") in error and "does not exist" in error


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors_names_the_file(damage, tmp_path):
    folder = _folder(tmp_path)
    path = folder / "model.safetensors"
    save_file({"model.norm.weight": torch.ones(8), "lm_head.weight": torch.ones(11, 8)}, str(path))
    data = path.read_bytes()
    path.write_bytes(b"\x07" * 64 if damage == "garbage" else data[: len(data) - 40])
    error = _import_error(folder, tmp_path)
    assert error.startswith(f"{path}: not a readable safetensors file")


def test_missing_tensor_is_named(tmp_path):
    folder = _folder(tmp_path)
    save_file({"model.norm.weight": torch.ones(8)}, str(folder / "model.safetensors"))
    assert "missing weight embed_tokens.weight (and " in _import_error(folder, tmp_path)




@pytest.mark.parametrize("container", ["zip", "legacy_pickle"])
def test_malicious_pickle_is_refused_and_runs_nothing(container, tmp_path):
    folder = _folder(tmp_path)
    marker = tmp_path / "pwned"
    path = folder / "pytorch_model.bin"
    plant(path, {"model.norm.weight": torch.ones(8), "evil": Exploit(str(marker))}, container)
    assert not marker.exists()
    error = _import_error(folder, tmp_path)
    assert error.startswith(f"{path}: refused: torch.load(weights_only=True)")
    assert not marker.exists()


def test_export_errors(tmp_path):
    with pytest.raises(ValueError, match="not a run directory"):
        export_hf(tmp_path, tmp_path / "hf")
    make_run(tmp_path / "run", tiny_config())
    with pytest.raises(ValueError, match="must differ from the run directory"):
        export_hf(tmp_path / "run", tmp_path / "run")
    with pytest.raises(ValueError, match="unknown export format 'onnx'; valid: hf, gguf"):
        export_hf(tmp_path / "run", tmp_path / "hf", format="onnx")
    (tmp_path / "run" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="model.safetensors: weight file does not exist"):
        export_hf(tmp_path / "run", tmp_path / "hf")


def test_cli_errors_are_one_line_with_exit_2(tmp_path, capsys):
    folder = _folder(tmp_path, model_type="deepseek_v3")
    assert main(["import", str(folder), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "MLA" in err and "\n" not in err
    assert main(["generate", str(tmp_path / "nowhere"), "--prompt", "x"]) == 2
    assert "neither a run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # dotted overrides belong to train only
        main(["export", str(tmp_path), str(tmp_path / "hf"), "model.vocab_size=3"])


def test_impossible_values_name_the_config(tmp_path):
    folder = _folder(tmp_path, model_type="mixtral", num_local_experts=2, num_experts_per_tok=3)
    error = _import_error(folder, tmp_path)
    assert error.startswith(f"{folder / 'config.json'}: moe.router.top_k must be between 1 and")
