"""Training lorasmith's own `AutoencoderKL` (the SD-style KL VAE) from scratch or from a VAE file.

    python -m trainer vae --config configs/toy/vae.yaml [train.max_steps=500 ...]

`config` (typed sections, torch-free), `losses` (reconstruction + KL + optional edge term, PSNR),
`train` (the loop, checkpoints, resume), `export` (latent statistics and scale, the ldm-layout VAE
file, reading VAEs back), `cli` (the subcommand). configs/README.md ("VAE training") documents
every key.
"""
