"""Evaluation of IMG: prompt sets, scorers, statistics, the report, and the ``img-eval`` pipeline.

- :mod:`.pipeline`  what ``img-eval`` runs: config resolution (with the recipe's encoders block),
  :mod:`.preflight`, then the generate / score / report stages
- :mod:`.preflight` every ``???``, prompt file, model, checkpoint and width checked before the first
  image, all problems in one error
- :mod:`.prompts`   loaders for the official prompt files (PartiPrompts, T2I-CompBench, HPD v2,
  DrawBench, Pick-a-Pic, plain text)
- :mod:`.scorers`   HPS v2, PickScore, CLIP, T2I-CompBench BLIP-VQA / CLIP / spatial proxy / 3-in-1,
  ImageReward, the LAION aesthetic predictor, the MLLM grader; one interface
  ``score(images, prompts) -> Tensor``, and a weight-free check per kind
- :mod:`.scoring`   the resumable score stage
- :mod:`.stats`     means, win rates (ties apart), seeded bootstrap intervals
- :mod:`.report`    CSV, JSON, paste-ready tables, HTML report (Jinja2 template in ``templates/``),
  PNG win-rate chart

Generation (base, IMG rounds, control) is the layer below, :mod:`img_lightning.generation`; the
prompt records, image store and arm names both use are in :mod:`img_lightning.eval_run`.
"""
