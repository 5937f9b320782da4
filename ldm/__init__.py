"""Latent-diffusion building blocks: autoencoder, UNet, text encoder, noise schedule, DDIM."""
