"""Command-line tools besides training: generate, convert, lora."""
