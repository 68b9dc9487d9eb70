"""Checkpoint converters: released checkpoints in their original formats -> the layouts we load.

* :mod:`.llava` - an original LLaVA-repository folder (``LlavaLlamaForCausalLM``, e.g. the
  IMG-finetuned ``shi-labs/IMG`` ``llava/``) -> an llava-hf ``LlavaForConditionalGeneration``
  folder + ``LlavaProcessor`` (``img-convert-llava``);
* :mod:`.llava_source` - reading and checking the original folder (config, weight shards, hashes).
"""
