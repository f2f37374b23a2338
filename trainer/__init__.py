"""Training loop, inference, export, conversion and LoRA tools (`python -m trainer`)."""
