"""UNet building blocks against the reference implementation's tiny golden outputs."""
import math

import torch

from cldm.controlnet import ControlledUnetModel
from ldm.modules.unet import UNetModel, timestep_embedding
from tests.helpers import COMPONENT_TOL, sub_state


def test_timestep_embedding_is_cos_then_sin():
    emb = timestep_embedding(torch.tensor([0.0, 10.0]), 4)
    # freqs = exp(-ln(1e4) * [0, 1] / 2) = [1, 0.01]
    expected = torch.tensor([[1, 1, 0, 0], [math.cos(10), math.cos(0.1), math.sin(10), math.sin(0.1)]])
    torch.testing.assert_close(emb, expected.float(), rtol=1e-6, atol=1e-6)


def test_plain_unet_matches_reference(tiny_arch, tiny_weights, tiny_io):
    unet = UNetModel(**tiny_arch["unet"])
    unet.load_state_dict(sub_state(tiny_weights, "model.diffusion_model."), strict=True)
    with torch.no_grad():
        eps = unet(tiny_io["x"], tiny_io["t"], tiny_io["context"])
    torch.testing.assert_close(eps, tiny_io["eps_plain"], **COMPONENT_TOL)


def test_controlled_unet_without_control_equals_plain(tiny_arch, tiny_weights, tiny_io):
    sd = sub_state(tiny_weights, "model.diffusion_model.")
    plain, controlled = UNetModel(**tiny_arch["unet"]), ControlledUnetModel(**tiny_arch["unet"])
    plain.load_state_dict(sd)
    controlled.load_state_dict(sd)
    with torch.no_grad():
        args = tiny_io["x"], tiny_io["t"], tiny_io["context"]
        assert torch.equal(plain(*args), controlled(*args))


def test_gradient_checkpointing_gives_same_gradients(tiny_arch, tiny_weights, tiny_io):
    grads = []
    for use_checkpoint in (False, True):
        unet = UNetModel(**{**tiny_arch["unet"], "use_checkpoint": use_checkpoint}).train()
        unet.load_state_dict(sub_state(tiny_weights, "model.diffusion_model."))
        unet(tiny_io["x"], tiny_io["t"], tiny_io["context"]).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
