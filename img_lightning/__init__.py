"""IMG Lightning: training, feature caching and evaluation for Implicit Multimodal Guidance.

Layers, lowest first; a module imports only from its own layer or lower ones (tests/test_layers.py):
foundation (errors, atomic, config, models, hf_quiet, log_steps, run_dir) -> cache -> data ->
features (encoders, recipe, convert) -> training (aligner, objective, module, callbacks, training,
finetune) -> eval_run -> generation -> evaluation -> cli; ``tiny`` and the ``preprocessing`` package
are applications on top.
"""

__version__ = "0.1.0"
