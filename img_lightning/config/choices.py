"""Config choices as Enums: a misspelled value fails at load time, like a misspelled key.

:class:`Choice` members are also plain strings: they compare, hash, format and serialise as their
value (``f"{cfg.encoders.ip.kind}"`` is ``sdxl_plus``, ``kind == "sdxl_plus"`` holds, a dict keyed
by the string finds them), so code and messages read them like the strings they replace. Each
member's name is its value, which is what OmegaConf matches a YAML value against.
"""

from __future__ import annotations

from enum import StrEnum


class Choice(StrEnum):
    pass


class Dtype(Choice):
    """A torch floating-point dtype by name (compute or storage)."""

    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"
