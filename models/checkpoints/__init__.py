"""Checkpoint formats: loading a model from a diffusers folder, a single file or a hub id
(`loading`), the single-file and diffusers key layouts and their converters, safetensors I/O."""
