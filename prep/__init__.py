"""Dataset preparation: chat sources into nanoGPT token files.

- `spec`: PrepSpec (what to do), PrepResult, PrepError
- `run`: prepare(spec): read, split, write; the fingerprint that skips unchanged work
- `chat`, `chitchat`, `dailydialog`: one module per source format
- `encode`: conversations to ids exactly as gencli.model.chat renders them, at tokenizer speed
- `writer`: the token files and meta.json, written atomically
"""
