"""Constants and small helpers shared by tests (importable, unlike conftest)."""

# Tolerances the reference implementation itself meets between runs (tests/fixtures/README.md).
COMPONENT_TOL = dict(rtol=1e-4, atol=1e-5)
DDIM_TOL = dict(rtol=1e-3, atol=1e-4)


def sub_state(sd: dict, prefix: str) -> dict:
    """Keys under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
