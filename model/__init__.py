"""The model core: GPT definition, checkpoints, tokenizer + chat template, generation engine.

Nothing here imports from the rest of gencli, so it can be read and tested alone.
"""
