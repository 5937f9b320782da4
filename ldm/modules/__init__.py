"""Neural-network modules of Stable Diffusion 2.1 as plain nn.Modules."""
