"""Evaluation of IMG: prompt sets, scorers, statistics and the report (``img-eval``).

- :mod:`.prompts`  loaders for the official prompt files (PartiPrompts, T2I-CompBench, HPD v2,
  DrawBench, Pick-a-Pic, plain text)
- :mod:`.scorers`  HPS v2, PickScore, CLIP, T2I-CompBench BLIP-VQA / CLIP / spatial proxy / 3-in-1,
  ImageReward, the LAION aesthetic predictor, the MLLM grader; one interface
  ``score(images, prompts) -> Tensor``
- :mod:`.stats`    means, win rates (ties apart), seeded bootstrap intervals
- :mod:`.report`   CSV, JSON, paste-ready tables, HTML report (Jinja2 template in ``templates/``),
  PNG win-rate chart
- :mod:`.scoring`  the resumable score stage; :mod:`.demo` the tiny end-to-end run for img-demo
Generation (base, IMG rounds, control) lives in :mod:`img_lightning.generation`.
"""
