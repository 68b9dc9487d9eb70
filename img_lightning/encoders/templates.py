"""Question templates for the MLLM guidance (our own paraphrases; template set ``img-v1``).

IMG asks the MLLM how the generated image should change to match its prompt, with one of ~100
paraphrased questions per sample. The set is versioned: its name is part of the cache key, so
editing a template means adding a new set (``img-v2``), never changing ``img-v1`` in place.

The template of a training pair is chosen from its pair id with a stable hash (sha256), so every
run, machine and Python process picks the same one (Python's ``hash()`` is salted per process).
"""

from __future__ import annotations

import hashlib

_IMG_V1 = (
    "How can the image be modified to correspond with the prompt: {prompt}?",
    "What changes would make this image match the prompt: {prompt}?",
    "How should this picture be edited so that it fits the description: {prompt}?",
    "In what ways could the image be adjusted to agree with the prompt: {prompt}?",
    "What would need to change in this image for it to depict: {prompt}?",
    "How could this image be altered to better reflect the prompt: {prompt}?",
    "Which modifications would bring this image in line with the prompt: {prompt}?",
    "What edits are needed so the image corresponds to: {prompt}?",
    "How might the picture be changed to match the text: {prompt}?",
    "What should be done to this image so that it agrees with the prompt: {prompt}?",
    "Describe how to modify the image so it matches the prompt: {prompt}.",
    "Explain what to change in this image to make it fit the prompt: {prompt}.",
    "How would you revise this image so that it follows the prompt: {prompt}?",
    "What adjustments would make the image consistent with: {prompt}?",
    "How can this image be improved to correspond to the prompt: {prompt}?",
    "Given the prompt \"{prompt}\", how should the image be modified?",
    "Given the description \"{prompt}\", what should change in this picture?",
    "The image was generated for the prompt \"{prompt}\". How can it be made to match it better?",
    "This picture should show: {prompt}. What needs to be changed?",
    "The intended content is: {prompt}. How should the image be edited to achieve it?",
    "What is missing or wrong in this image with respect to the prompt: {prompt}?",
    "Compared with the prompt \"{prompt}\", what should be modified in the image?",
    "How do you need to change the image so that it depicts the prompt: {prompt}?",
    "Which parts of the image should be changed to satisfy the prompt: {prompt}?",
    "How could the scene in this image be modified to correspond with: {prompt}?",
    "What would you alter in this picture to make it faithful to the prompt: {prompt}?",
    "How can the image be corrected so that it matches the prompt: {prompt}?",
    "To match the prompt \"{prompt}\", how should this image be changed?",
    "What modifications does this image need to reflect the prompt: {prompt}?",
    "How should the content of the image change to correspond with the prompt: {prompt}?",
    "Suggest how this image could be modified to match the description: {prompt}.",
    "What should be added, removed or changed so the image fits: {prompt}?",
    "How can this image be reworked so that it represents the prompt: {prompt}?",
    "In order to correspond with \"{prompt}\", how should the image be modified?",
    "How could the image be edited to align with the prompt: {prompt}?",
    "What changes to this image would make it agree with the text prompt: {prompt}?",
    "How would the image have to look different to match the prompt: {prompt}?",
    "What needs to be different in this picture for it to match: {prompt}?",
    "How can the image be adapted so that it corresponds to the prompt: {prompt}?",
    "Tell me how to modify this image so it matches the prompt: {prompt}.",
    "How would you change this image to better fit the prompt: {prompt}?",
    "What would make this image a more accurate rendering of the prompt: {prompt}?",
    "How can the picture be changed so it is consistent with the description: {prompt}?",
    "Looking at this image, how should it be modified to match the prompt: {prompt}?",
    "Which changes should be made to the image to reflect the prompt: {prompt}?",
    "How should the image be transformed to correspond with the prompt: {prompt}?",
    "What edits would make this image satisfy the prompt: {prompt}?",
    "How could the image be refined so that it matches the prompt: {prompt}?",
    "How might this image be modified to be faithful to: {prompt}?",
    "What would you change in the image to match the request: {prompt}?",
    "The user asked for: {prompt}. How should this image be modified to deliver it?",
    "How can the visual content be changed to correspond with the prompt: {prompt}?",
    "What alterations would bring the image closer to the prompt: {prompt}?",
    "How should this image be updated so it matches the prompt: {prompt}?",
    "What are the necessary modifications for this image to match: {prompt}?",
    "How could this picture be edited to correspond more closely to: {prompt}?",
    "In what way should the image be modified to fit the prompt: {prompt}?",
    "What should change in the image so that it conforms to the prompt: {prompt}?",
    "How do the objects, colors or layout need to change to match the prompt: {prompt}?",
    "How can the image be modified so that it shows exactly: {prompt}?",
    "What would you fix in this image to match the prompt: {prompt}?",
    "How could the image be changed to fulfil the prompt: {prompt}?",
    "What improvements would make the image correspond with: {prompt}?",
    "How should the picture be modified to be consistent with the prompt: {prompt}?",
    "Which aspects of the image should be modified to match the prompt: {prompt}?",
    "How can this image be edited so it corresponds to the caption: {prompt}?",
    "What changes would align this picture with the caption: {prompt}?",
    "How would you modify the image so it matches the caption: {prompt}?",
    "What must be changed in this image to correspond with the caption: {prompt}?",
    "How could the image better match what the prompt describes: {prompt}?",
    "If the target is \"{prompt}\", how should this image be modified?",
    "For the prompt \"{prompt}\", what changes would improve this image?",
    "How can the image be brought into agreement with the prompt: {prompt}?",
    "What would have to be modified for this image to illustrate: {prompt}?",
    "How can this image be changed to depict the prompt more faithfully: {prompt}?",
    "What would you adjust in the image so that it matches the prompt: {prompt}?",
    "How can the image be modified to represent the prompt: {prompt}?",
    "What modifications are required for the image to correspond with: {prompt}?",
    "How should one edit this picture so that it corresponds to the prompt: {prompt}?",
    "What should be changed about this image to fit the prompt: {prompt}?",
    "How can we modify this image so that it agrees with: {prompt}?",
    "What is the best way to change this image to match the prompt: {prompt}?",
    "How would the image need to be modified to correspond with the prompt: {prompt}?",
    "Which edits would make this image correspond with the text: {prompt}?",
    "How could you change the picture so that it matches the description: {prompt}?",
    "What modifications would make this picture match the prompt: {prompt}?",
    "How can the image be changed to follow the prompt more closely: {prompt}?",
    "What differences between the image and the prompt \"{prompt}\" should be fixed?",
    "How can the mismatch between this image and the prompt \"{prompt}\" be corrected?",
    "Where does the image deviate from the prompt \"{prompt}\", and how should it be changed?",
    "How would you edit this image to correspond with the prompt: {prompt}?",
    "What should be modified in the image to be true to the prompt: {prompt}?",
    "How could this image be modified to match the prompt's description: {prompt}?",
    "What changes could make the image correspond to the given prompt: {prompt}?",
    "How can the image be altered so that it corresponds with the prompt: {prompt}?",
    "How should the image be modified to better correspond with the prompt: {prompt}?",
    "What would bring this image into correspondence with the prompt: {prompt}?",
    "How can the content of this picture be modified to match: {prompt}?",
    "What should be edited in this image so that it reflects the prompt: {prompt}?",
    "How can the image be modified to correspond with this prompt: {prompt}?",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"img-v1": _IMG_V1}


def templates(template_set: str = "img-v1") -> tuple[str, ...]:
    try:
        return TEMPLATE_SETS[template_set]
    except KeyError:
        raise ValueError(f"unknown template set {template_set!r}; available: {sorted(TEMPLATE_SETS)}") from None


def template_id_for(pair_id: str, template_set: str = "img-v1") -> int:
    """Deterministic template index of a pair: ``sha256(set + ":" + pair_id) mod len(set)``."""
    digest = hashlib.sha256(f"{template_set}:{pair_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % len(templates(template_set))


def build_question(prompt: str, template_id: int, template_set: str = "img-v1") -> str:
    """The question asked about an image generated for ``prompt``."""
    items = templates(template_set)
    if not 0 <= template_id < len(items):
        raise ValueError(f"template id {template_id} out of range for {template_set!r} ({len(items)} templates)")
    # str.replace, not str.format: prompts may contain braces.
    return items[template_id].replace("{prompt}", prompt.strip())
