"""cldm/convert.py: the initial checkpoint from plain SD weights."""
import pytest
import torch

from cldm.checkpoint import CheckpointError
from cldm.convert import init_from_sd
from cldm.model import TINY_CONFIG, create_model, load_config
from tests.train_helpers import tiny_sd_state

INPUT_CONV = "model.diffusion_model.input_blocks.0.0.weight"


def test_the_input_conv_is_widened_with_zeros():
    sd = tiny_sd_state()
    out, report = init_from_sd(create_model(load_config(TINY_CONFIG)), sd)  # v2: 4 + 5 input channels
    assert out[INPUT_CONV].shape[1] == 9 and INPUT_CONV in report.widened
    assert torch.equal(out[INPUT_CONV][:, :4], sd[INPUT_CONV]) and not out[INPUT_CONV][:, 4:].any()


@pytest.mark.parametrize("shape", [(64, 4, 3, 3), (32, 4, 1, 1), (32, 12, 3, 3)])
def test_an_input_conv_that_cannot_be_widened_is_named_with_the_other_mismatches(shape):
    """An SD file of another architecture (other widths, a wider input) is refused in the one
    line every other mismatch gets, saying what the file looks like and that it does not fit the
    config, not as a bare "cannot widen shape" that stops at the first conv."""
    sd = {**tiny_sd_state(), INPUT_CONV: torch.zeros(shape)}
    with pytest.raises(CheckpointError) as e:
        init_from_sd(create_model(load_config(TINY_CONFIG)), sd)
    line = str(e.value)
    assert line.startswith("checkpoint (unknown SD variant (context dim 32) weights) does not match the model config: ")
    for key in (INPUT_CONV, "control_model.input_blocks.0.0.weight"):  # the ControlNet's copy of it too
        assert f"{key}: file {shape} vs model (32, 9, 3, 3)" in line
