"""Nothing in a checkpoint runs code: the pickles that torch (DCP's ``.metadata``) and DeepSpeed
(``engine/*.pt``) unpickle for us are scanned first (checkpointing/pickles.py). A planted
``__reduce__`` is refused by name in export, evaluation and every load; no marker appears."""

import os
import pickle
import shutil

import pytest
import torch

from megatron_unihetero.checkpointing import dist as dist_ckpt
from megatron_unihetero.checkpointing import pickles
from megatron_unihetero.checkpointing.errors import CheckpointError
from megatron_unihetero.testing.tools import load_tool
from megatron_unihetero.training import checkpoint as ckpt

from tests.hf.test_hf_errors import folders  # noqa: F401  (the imported checkpoint fixture)


class Payload:
    """Unpickling it creates ``path`` (open for writing): the marker of code that ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_the_scan_reads_globals_without_running_them(tmp_path):
    marker = tmp_path / "marker"
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        data = pickle.dumps({"x": [Payload(marker)]}, protocol=protocol)
        with pytest.raises(CheckpointError, match="refers to io.open"):
            pickles.check_pickle_bytes(data, pickles.DCP_METADATA, "planted")
    # A STACK_GLOBAL whose operands sit under two popped strings: the simulated stack sees them.
    disguised = (b"\x80\x04\x8c\x02os\x8c\x06system\x8c\x0bcollections\x8c\x0bOrderedDict00\x93"
                 b"\x8c\x04true\x85R.")
    assert list(pickles.pickle_globals(disguised)) == [("os", "system")]
    with pytest.raises(CheckpointError, match="extension registry"):
        pickles.check_pickle_bytes(b"\x80\x02\x82\x01)R.", pickles.DCP_METADATA, "ext")
    # what torch.save writes for tensors in containers passes; a payload inside one does not
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save({"w": torch.ones(2, dtype=torch.bfloat16), "shape": torch.Size([2])}, good)
    pickles.check_torch_file(str(good))
    torch.save({"w": torch.ones(2), "evil": Payload(marker)}, bad)
    with pytest.raises(CheckpointError, match=r"bad\.pt.*io\.open"):
        pickles.check_torch_files(str(tmp_path))
    assert not marker.exists()


def test_a_planted_metadata_pickle_is_refused_by_export_evaluate_and_load(folders, tmp_path, capsys):  # noqa: F811
    planted = str(tmp_path / "planted")
    shutil.copytree(folders["ckpt"], planted)
    iter_dir = ckpt.latest_iteration_dir(planted)
    marker = tmp_path / "marker"
    with open(os.path.join(iter_dir, "dist", ".metadata"), "wb") as handle:
        pickle.dump(Payload(marker), handle)
    ckpt.write_manifest(iter_dir)  # whoever planted it rewrote the manifest too
    expected = f"{os.path.join(iter_dir, 'dist', '.metadata')} refers to io.open"

    # export (tools/convert_checkpoint_to_hf.py): an error line, no traceback, nothing written
    out = str(tmp_path / "hf")
    assert load_tool("convert_checkpoint_to_hf").main(["--load", planted, "--save", out]) == 2
    assert expected in capsys.readouterr().err and not os.path.exists(out)
    # evaluate: a usage error naming the file
    from megatron_unihetero import evaluate

    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--load", planted, "--data", str(tmp_path / "unused.tsv")])
    assert exit_info.value.code == 2 and expected in capsys.readouterr().err
    # the load every resume, checkpoint.load and tool goes through
    with pytest.raises(CheckpointError, match="refers to io.open"):
        dist_ckpt.content(dist_ckpt.dist_dir(iter_dir))
    assert not marker.exists()


def test_a_checkpoint_of_another_width_names_the_key_and_both_shapes(folders):  # noqa: F811
    """torch's loader raises a BaseException with a traceback dump per rank; the error is the
    one CheckpointError, naming the tensor and both shapes."""
    import dataclasses

    from megatron_unihetero.config_io import load_config
    from megatron_unihetero.training.config import RunConfig

    iter_dir = ckpt.latest_iteration_dir(folders["ckpt"])
    model = load_config(RunConfig, os.path.join(iter_dir, "config.yaml")).model
    wider = dataclasses.replace(model, llm=dataclasses.replace(model.llm, ffn_hidden_size=2 * model.llm.ffn_hidden_size))
    with pytest.raises(CheckpointError, match=r"Global shape mismatch for loaded .* and expected .* "
                                              r"for key llm\.decoder\.layers\.mlp\.linear_fc1\.weight"):
        dist_ckpt.load_full_model_state(iter_dir, wider)
