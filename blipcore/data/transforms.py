"""Image preprocessing: PIL RGB image -> normalised float tensor [3, S, S], as BLIP does it, and the training
augmentations of `data.augment` (the named sets of `config.AUGMENT_SETS`).

The steps: "crop", a random resized crop (50-100 % of the area); "jitter", mild colour jitter (brightness,
contrast and saturation, never hue: captions name colours); "flip", a horizontal flip with "left" and "right"
swapped in the caption (`swap_left_right`). Crop and jitter are the image transform `build_transform` returns;
the flip is not, because it changes the caption too: a dataset draws it per item (`draws_flip`, seeded like the
item's other random draws), flips the transformed image and swaps its caption's words together, before
tokenisation. Evaluation images are never augmented.
"""

from __future__ import annotations

import random
import re

import torch

from .._torchvision import transforms
from ..model.config import AUGMENT_SETS

# CLIP's statistics, which BLIP reuses.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

_BICUBIC = transforms.InterpolationMode.BICUBIC


STEPS = ("crop", "jitter", "flip")  # the steps an AUGMENT_SETS entry may name
# Mild on purpose: captions name colours ("a white dog", "a dark red bus"), and a strong jitter would make a white
# dog grey or a dark red bus black. Each factor is drawn from [1 - x, 1 + x]; hue is never changed.
JITTER = {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2}
FLIP_P = 0.5  # the chance that a training item is flipped, when its set has "flip"


def augment_steps(augment: str) -> tuple[str, ...]:
    """The steps of the augmentation set named `augment` (config.AUGMENT_SETS), in order; ValueError for a name
    that is not a set, or a set with a step this module does not know."""
    if augment not in AUGMENT_SETS:
        raise ValueError(f"augment {augment!r}: expected one of {', '.join(AUGMENT_SETS)}")
    steps = AUGMENT_SETS[augment]
    unknown = [step for step in steps if step not in STEPS]
    if unknown:
        raise ValueError(f"augment {augment!r}: unknown step {unknown[0]!r} (known: {', '.join(STEPS)})")
    return steps


def flips(augment: str) -> bool:
    """Whether the augmentation set named `augment` flips training items (see `draws_flip`)."""
    return "flip" in augment_steps(augment)


def draws_flip(key: str) -> bool:
    """Whether the item whose random draws are seeded by `key` (e.g. "{seed}:{epoch}:{item}") is flipped, with
    probability FLIP_P: a function of the key alone, never of a process's random stream."""
    return random.Random(f"{key}:flip").random() < FLIP_P


def build_transform(image_size: int, train: bool, augment: str = "crop", crop: bool = True) -> transforms.Compose:
    """The image transform. Eval (train=False): resize to a square. Train: the "crop" and "jitter" steps of the set
    `augment` ("crop", the default: a random resized crop of 50-100 % of the area; a set without "crop", or
    crop=False, resizes as evaluation does). `crop=False` leaves the crop out (generated scenes: their captions
    place objects, which a crop would move or cut). The "flip" step is not here: the dataset applies it
    (`draws_flip`), since it swaps the caption's words too. Both normalise.

    Random draws come from torch's global generator: seed it per item (the datasets do) for reproducible items."""
    steps = augment_steps(augment) if train else ()
    if "crop" in steps and crop:
        resize = transforms.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=_BICUBIC, antialias=True)
    else:
        resize = transforms.Resize((image_size, image_size), interpolation=_BICUBIC, antialias=True)
    pipeline = [resize, transforms.ToImage(), transforms.ToDtype(torch.float32, scale=True)]
    if "jitter" in steps:  # on the [0, 1] float image: no rounding to 8 bits between the factors
        pipeline.append(transforms.ColorJitter(**JITTER))
    return transforms.Compose([*pipeline, transforms.Normalize(MEAN, STD)])


# --- the flip's caption side -----------------------------------------------------------------------------------
# Words that name a side, and their mirror images. Hyphenated forms ("left-hand", "top-left", "left-most") are
# handled through their "left" / "right" part.
_MIRROR = {"left": "right", "leftmost": "rightmost", "lefthand": "righthand", "lefthanded": "righthanded",
           "leftward": "rightward", "leftwards": "rightwards"}
_MIRROR |= {right: left for left, right in _MIRROR.items()}
_WORD = re.compile(r"[A-Za-z]+")
_NEIGHBOURS = re.compile(r"\s+|\s*-\s*")  # what may separate a word from the neighbours that decide its sense
# A "left" or "right" after one of these names a side, whatever follows ("on the left", "his right hand",
# "top left", "turn right into"). Not "looking", "pointing", ...: "looking right at the camera" is the intensifier.
_SIDE_CUES = frozenset(
    "the a an this that his her its their my your our to far extreme upper lower top bottom front back rear middle "
    "center centre turn turns turned turning veer veers veered veering swerve swerves swerved swerving steer steers "
    "steered steering".split())
# "right" before one of these (and after no side cue) is the intensifier: "sitting right next to", "right behind".
_INTENSIFIED = frozenset(
    "next behind beside by here there now in inside outside on at above below under underneath beneath over "
    "between after before along up down into onto through near against off across around toward towards".split())
# "left" after one of these, or before one of the next set (and after no side cue), is the verb "leave":
# "has left", "was left", "luggage left on the sidewalk", "food left over".
_LEFT_AFTER = frozenset("is are was were be been being has have had get gets got getting nothing".split())
_LEFT_BEFORE = frozenset(
    "behind alone unattended over out open outside inside lying sitting standing parked on in by for there here "
    "untouched empty unfinished uneaten".split())


def _names_side(word: str, before: str | None, after: str | None) -> bool:
    """Whether `word` (lower case), between the words `before` and `after` (lower case, None at a phrase's edge),
    names a side."""
    if word not in ("left", "right") or before in _SIDE_CUES:
        return True
    if word == "right":
        return before != "all" and after not in _INTENSIFIED
    return before not in _LEFT_AFTER and after not in _LEFT_BEFORE


def _same_case(word: str, replacement: str) -> str:
    if len(word) > 1 and word.isupper():
        return replacement.upper()
    return replacement.capitalize() if word[0].isupper() else replacement


def swap_left_right(caption: str) -> str:
    """The caption of the horizontally flipped image: every word that names a side swapped with its mirror image.

    Swapped, as whole words in any case ("Left" -> "Right", "LEFT" -> "RIGHT"): left <-> right, leftmost <->
    rightmost, lefthand(ed) <-> righthand(ed), leftward(s) <-> rightward(s), and so the hyphenated "left-hand",
    "left-handed", "top-left", "far-right". Swapped both ways at once: "a dog on the left and a cat on the right"
    -> "a dog on the right and a cat on the left".

    Never touched: words that only contain the letters ("leftover", "bright", "alright", "righteous", "upright",
    "copyright", "cleft"), and, by the neighbouring words (separated by spaces or a hyphen only), the senses that
    name no side: "all right"; "right" as an intensifier, i.e. before a word such as next, behind, beside, in, on
    top ... ("sitting right next to a dog", "right in front of"); "left" as the verb "leave", i.e. after is / was /
    has / been ... or before a word such as behind, alone, unattended, over, on, in ("has left", "luggage left on
    the sidewalk", "food left over"). A side cue before the word wins over both ("on the right next to a cat",
    "turn right in", "to the left on"). These rules are heuristics for captions, not a parser: rare phrasings
    (e.g. "the ball is left of the bat") can be kept where they should swap.
    """
    words = list(_WORD.finditer(caption))
    pieces, end = [], 0
    for i, match in enumerate(words):
        word = match.group().lower()
        if word not in _MIRROR:
            continue
        before = after = None
        if i > 0 and _NEIGHBOURS.fullmatch(caption[words[i - 1].end():match.start()]):
            before = words[i - 1].group().lower()
        if i + 1 < len(words) and _NEIGHBOURS.fullmatch(caption[match.end():words[i + 1].start()]):
            after = words[i + 1].group().lower()
        if _names_side(word, before, after):
            pieces += [caption[end:match.start()], _same_case(match.group(), _MIRROR[word])]
            end = match.end()
    return "".join(pieces) + caption[end:]


def denormalize(tensor: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation of a [3, H, W] or [B, 3, H, W] tensor, clamped to [0, 1] for display."""
    mean = torch.tensor(MEAN, dtype=tensor.dtype, device=tensor.device).view(3, 1, 1)
    std = torch.tensor(STD, dtype=tensor.dtype, device=tensor.device).view(3, 1, 1)
    return (tensor * std + mean).clamp(0.0, 1.0)
