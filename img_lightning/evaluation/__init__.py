"""Evaluation of IMG: prompt sets, scorers, statistics and the report (``img-eval``).

- :mod:`.prompts`  loaders for the official prompt files (PartiPrompts, T2I-CompBench, HPD v2,
  DrawBench, Pick-a-Pic, plain text)
- :mod:`.scorers`  HPS v2, PickScore, CLIP, T2I-CompBench BLIP-VQA / CLIP / spatial proxy / 3-in-1,
  one interface ``score(images, prompts) -> Tensor``
- :mod:`.stats`    means, win rates (ties apart), seeded bootstrap intervals
- :mod:`.report`   CSV, JSON, HTML gallery, PNG win-rate chart
- :mod:`.scoring`  the resumable score stage; :mod:`.demo` the tiny end-to-end run for img-demo
Generation (base, IMG rounds, control) lives in :mod:`img_lightning.generation`.
"""
