"""Dataset preparation: chat sources into nanoGPT token files."""
