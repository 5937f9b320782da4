"""Our constructor kwargs from the reference implementation's tiny_arch.json.

The reference's UNet config carries keys that only describe the reference's own code paths.
Our UNet/ControlNet accept exactly their arguments (a stray key is an error), so those keys
are checked to mean what we implement and then removed here, explicitly.
"""

# key -> the only value our implementation corresponds to (None: any value, it has no effect here)
REFERENCE_ONLY = {
    "image_size": None,               # unused by the reference's UNet forward as well
    "use_spatial_transformer": True,  # we always build spatial transformers
    "legacy": False,                  # head count from num_head_channels, as in SD2.x
}


def unet_kwargs(tiny_arch: dict, *, controlnet: bool = False) -> dict:
    kw = dict(tiny_arch["unet"])
    for key, value in REFERENCE_ONLY.items():
        got = kw.pop(key)
        assert value is None or got == value, f"tiny_arch.json {key}={got!r}: not what this UNet implements"
    if controlnet:
        kw.pop("out_channels")  # the ControlNet has no output conv
    return kw
