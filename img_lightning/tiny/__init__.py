"""Tiny, randomly initialised models saved in the REAL on-disk formats.

No weights can be downloaded in CI or the demo, so every real loading path (``from_pretrained``,
``load_ip_adapter``) is exercised on these instead: they are built here, written to disk exactly
as the released models are laid out, and loaded back through the same code users run on the real
checkpoints. Sizes are chosen so a forward pass takes milliseconds on a CPU.

:mod:`.world` builds the demo's models and :mod:`.demo_eval` runs the evaluation pipeline on them
(the end of ``img-demo``). Like ``preprocessing``, this package sits on top of the library.
"""
