"""What ``--resume`` lets DeepSpeed unpickle: ``moe.parallel.deepspeed.pickle_guard.check_pickled_files`` on hand-made files, in
this process (no DeepSpeed engine, no process group).

DeepSpeed loads its checkpoint files with ``torch.load(weights_only=False)``; the check disassembles each
``*.pt`` file first (``torch.serialization.get_unsafe_globals_in_checkpoint``, which runs nothing) and refuses a
global outside torch's weights-only set and the three classes DeepSpeed's ZeRO files hold, and any file it
cannot disassemble. The end-to-end cases (forged files in real DeepSpeed checkpoints, refused by ``resume`` on
2 ranks; the allow-list re-derived from real ZeRO 0/1/2 checkpoints) are in ``tests/parallel/test_deepspeed.py``.
"""

from __future__ import annotations

import collections
import contextlib
import json
from pathlib import Path

import pytest
import torch

from moe.parallel.deepspeed.config import load_config
from moe.parallel.deepspeed.pickle_guard import DEEPSPEED_PICKLE_GLOBALS, check_pickled_files
from tests.reliability.common import RECIPE
from tests.exploit import Exploit, plant




def _deepspeed_like() -> dict:
    """What a ZeRO 1/2 optimizer file holds, in kind: tensors, sizes, ordered dicts and DeepSpeed's 3 classes."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return {"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                                     "param_slice_mappings": [collections.OrderedDict(
                                         w=fragment_address(numel=4, start=0))],
                                     "single_partition_of_fp32_groups": [torch.zeros(4)]},
            "shapes": torch.Size([2, 2]), "ds_version": "0.19.8", "bf16": torch.zeros(2, dtype=torch.bfloat16)}


def test_deepspeeds_own_classes_pass(tmp_path):
    torch.save(_deepspeed_like(), tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save({"module": collections.OrderedDict(w=torch.ones(3))}, tmp_path / "mp_rank_00_model_states.pt")
    (tmp_path / "manifest.json").write_text("{}")  # not a .pt file: not inspected
    check_pickled_files(tmp_path)
    assert len(DEEPSPEED_PICKLE_GLOBALS) == 3


def _write(path: Path, container: str, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if container == "zip_protocol_4":  # STACK_GLOBAL takes its names from the stack: not disassembled
        torch.save({"w": torch.zeros(2)}, path, pickle_protocol=4)
    elif container == "empty":
        path.write_bytes(b"")
    else:
        plant(path, {**_deepspeed_like(), "exploit": Exploit(str(marker))}, container)


@pytest.mark.parametrize("container,name,why", [
    ("zip", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
     "it refers to the Python global io.open, which DeepSpeed's checkpoint files do not use"),
    ("zip", "zero/some.param/fp32.pt", "it refers to the Python global io.open"),  # a subfolder: inspected too
    ("legacy_pickle", "mp_rank_00_model_states.pt", "it cannot be inspected without running it (Expected input "
                                                     "to be a checkpoint returned by torch.save)"),
    ("zip_protocol_4", "mp_rank_00_model_states.pt", "it cannot be inspected without running it ("),
    ("empty", "mp_rank_00_model_states.pt", "it cannot be inspected without running it ("),
])
def test_a_file_that_could_run_code_is_refused_unrun(tmp_path, container, name, why):
    torch.save(_deepspeed_like(), tmp_path / "a_genuine_file.pt")
    marker = tmp_path / "pwned"
    _write(tmp_path / name, container, marker)
    if container in ("zip", "legacy_pickle"):  # the payload is live: an unsafe load runs it
        probe = tmp_path / "probe" / "probe.pt"
        _write(probe, container, tmp_path / "ran_in_probe")
        with contextlib.suppress(RuntimeError):  # a plain pickle fails torch.load after it ran
            torch.load(probe, weights_only=False)
        assert (tmp_path / "ran_in_probe").exists()
        probe.unlink()
    with pytest.raises(ValueError) as err:
        check_pickled_files(tmp_path)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / name} cannot be loaded safely: {why}"), message
    assert "\n" not in message and not marker.exists()


def test_the_ranks_share_the_files(tmp_path):
    for i in range(4):
        torch.save({"w": torch.zeros(1)}, tmp_path / f"f{i}.pt")
    _write(tmp_path / "f2b.pt", "zip", tmp_path / "pwned")  # sorted: f0 f1 f2 f2b f3 -> shard (1, 2) has f1 f2b
    check_pickled_files(tmp_path, shard=(0, 2))
    with pytest.raises(ValueError, match="f2b.pt cannot be loaded safely"):
        check_pickled_files(tmp_path, shard=(1, 2))


def test_a_torch_without_the_inspector_refuses_clearly(tmp_path, monkeypatch):
    monkeypatch.delattr(torch.serialization, "get_unsafe_globals_in_checkpoint")
    check_pickled_files(tmp_path)  # nothing to load, nothing to refuse
    torch.save({"w": torch.zeros(1)}, tmp_path / "mp_rank_00_model_states.pt")
    with pytest.raises(ValueError) as err:
        check_pickled_files(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'mp_rank_00_model_states.pt'} cannot be loaded safely: torch "
                                     f"{torch.__version__} lacks torch.serialization."
                                     "get_unsafe_globals_in_checkpoint (torch >= 2.5)")


def test_legacy_pickle_checkpoints_cannot_be_configured(tmp_path):
    from moe.config import load_recipe

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"checkpoint": {"checkpoint_serialization": False}}))
    recipe = load_recipe(RECIPE, [f"parallel.deepspeed_config={user}"])
    with pytest.raises(ValueError, match="checkpoint.checkpoint_serialization=false writes legacy pickles"):
        load_config(recipe, 2, cuda=False)
