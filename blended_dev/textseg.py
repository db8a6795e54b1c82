"""What the text segmenter's training (tools/train_textseg.py), tests and benchmark (bench/select_text.py) share:
phrases that name objects of demo scenes, the masks they name, held-out cases, and CLIPSeg models built in-process
(tiny and random for tests, true-size and random for timings).

Seed ranges (all scenes from `blended_dev.scenes.make_scene`):

* training: from `TRAIN_TEXT_START` upwards, inside the demo world's training range (< TRAIN_SEED_END);
* tuning (the threshold, the refinement's settings): `HELDOUT_SEED_START + 940000` upwards;
* evaluation (tests, the benchmark): `HELDOUT_SEED_START + 930000` upwards (never used for any choice).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .scenes import COLOURS, HELDOUT_SEED_START, SHAPES, TRAIN_SEED_END, make_scene

TRAIN_TEXT_START = 30_000_000
EVAL_TEXT_START = HELDOUT_SEED_START + 930_000
TUNE_TEXT_START = HELDOUT_SEED_START + 940_000
assert TRAIN_TEXT_START + 10_000_000 < TRAIN_SEED_END

FULL = ("the {c} {s}", "a {c} {s}", "{c} {s}")  # phrases naming colour and shape
COLOUR_ONLY = ("the {c} one", "the {c} shape", "{c}")
SHAPE_ONLY = ("the {s}", "a {s}", "{s}")
N_OBJECTS_P = (0.2, 0.4, 0.4)  # training scenes with 1, 2, 3 objects
NEGATIVE_P = 0.1  # training phrases that name a random colour and shape (often absent: an empty target)


def named(objects, masks, colour=None, shape=None) -> np.ndarray:
    """The union of the masks of every object with this colour and shape (None: any), (64, 64) bool."""
    out = np.zeros(masks[0].shape if masks else (64, 64), bool)
    for o, m in zip(objects, masks):
        if (colour is None or o.colour == colour) and (shape is None or o.shape == shape):
            out |= m
    return out


def phrase_for(rng: np.random.Generator, sc, i: int) -> tuple[str, np.ndarray]:
    """(phrase, target) naming object `i` of scene `sc` by colour and shape (70 %), by colour alone or shape alone
    (15 % each), every matching object the target; a random colour and shape `NEGATIVE_P` of the time (or when
    there is no object `i`)."""
    if i >= len(sc.objects) or rng.random() < NEGATIVE_P:
        c, s = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        return str(rng.choice(FULL)).format(c=c, s=s), named(sc.objects, sc.masks, c, s)
    o = sc.objects[i]
    kind = rng.choice(3, p=[0.7, 0.15, 0.15])
    c, s = (o.colour, o.shape) if kind == 0 else (o.colour, None) if kind == 1 else (None, o.shape)
    template = str(rng.choice((FULL, COLOUR_ONLY, SHAPE_ONLY)[kind]))
    return template.format(c=c, s=s), named(sc.objects, sc.masks, c, s)


def training_scene(seed: int, k: int = 3) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """(image (64, 64, 3) uint8, [(phrase, target (64, 64) bool)] * k) for one training scene of one to three
    objects: each object named once in a random order (`phrase_for`), then phrases naming nothing there or
    again an object, so one picture is seen with several words and the model must tell them apart."""
    rng = np.random.default_rng([seed, 29])
    sc = make_scene(seed, int(rng.choice([1, 2, 3], p=N_OBJECTS_P)))
    order = list(rng.permutation(len(sc.objects))) + [int(rng.integers(len(sc.objects) + 1)) for _ in range(k)]
    return sc.image, [phrase_for(rng, sc, int(i)) for i in order[:k]]


@dataclass
class TextCase:
    """A held-out selection: the scene, the phrase naming one object, its true mask and the other objects'."""

    seed: int
    image: np.ndarray  # (64, 64, 3) uint8
    phrase: str  # "the red circle"
    mask: np.ndarray  # (64, 64) bool, the named object
    others: list  # the other objects' masks


def heldout_cases(n: int, n_objects: int, start: int = EVAL_TEXT_START) -> list[TextCase]:
    """`n` scenes with exactly `n_objects` objects from seed `start` on, each with one object whose colour and
    shape no other object shares (picked by the seed), named "the COLOUR SHAPE" (scenes where none is unique are
    skipped)."""
    cases, seed = [], start + 100_000 * n_objects
    while len(cases) < n:
        sc = make_scene(seed, n_objects)
        pairs = [(o.colour, o.shape) for o in sc.objects]
        unique = [i for i, p in enumerate(pairs) if pairs.count(p) == 1]
        if len(sc.objects) == n_objects and unique:
            i = unique[seed % len(unique)]
            cases.append(TextCase(seed, sc.image, f"the {pairs[i][0]} {pairs[i][1]}", sc.masks[i],
                                  [m for j, m in enumerate(sc.masks) if j != i]))
        seed += 1
    return cases


# -- models ------------------------------------------------------------------------------------------

def tiny_config(vocab_size: int = 99):
    """A tiny CLIPSegConfig (32 px, patch 4, hidden 32): logits (B, 32, 32)."""
    from transformers import CLIPSegConfig

    return CLIPSegConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=2, eos_token_id=3,
                         pad_token_id=0),
        vision_config=dict(image_size=32, patch_size=4, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=32, reduce_dim=16, extract_layers=[0, 1], decoder_num_attention_heads=2,
        decoder_intermediate_size=32)


def demo_processor(size: int = 64):
    """CLIPSegProcessor for the demo world: the demo model's word-level tokenizer (assets/demo/tokenizer) and
    a ViT image processor resizing to `size` px, values in [-1, 1]."""
    from transformers import AutoTokenizer, CLIPSegProcessor, ViTImageProcessor

    root = Path(__file__).resolve().parents[1]
    tokenizer = AutoTokenizer.from_pretrained(root / "assets" / "demo" / "tokenizer")
    images = ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                               resample=2)  # bilinear
    return CLIPSegProcessor(image_processor=images, tokenizer=tokenizer)


def build_tiny_clipseg(folder: Path, *, seed: int = 0, pickle_only: bool = False) -> Path:
    """A tiny random CLIPSegForImageSegmentation with the demo processor (32 px) saved to `folder`: safetensors,
    or with `pickle_only` a pytorch_model.bin alone (a folder the loader must refuse)."""
    import torch
    from transformers import CLIPSegForImageSegmentation

    torch.manual_seed(seed)
    processor = demo_processor(32)
    model = CLIPSegForImageSegmentation(tiny_config(len(processor.tokenizer))).eval()
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    if pickle_only:
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    return folder


def clipseg_sized(seed: int = 0):
    """(model, processor): CLIPSeg at the true shapes of CIDAS/clipseg-rd64-refined (ViT-B/16, 352 px, reduce 64,
    complex transposed convolution; about 150 M parameters), random weights, the real CLIP BPE tokenizer."""
    import tempfile

    import torch
    from transformers import (CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, CLIPTokenizer,
                              ViTImageProcessor)

    from blended.models.single_file import clip_bpe_files

    torch.manual_seed(seed)
    cfg = CLIPSegConfig(vision_config=dict(patch_size=16), projection_dim=512, reduce_dim=64,
                        extract_layers=[3, 6, 9], decoder_num_attention_heads=4, decoder_intermediate_size=2048,
                        use_complex_transposed_convolution=True)
    vocab, merges = clip_bpe_files(Path(tempfile.mkdtemp(prefix="clip-bpe-")))
    tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=77)
    images = ViTImageProcessor(size={"height": 352, "width": 352}, image_mean=[0.485, 0.456, 0.406],
                               image_std=[0.229, 0.224, 0.225])
    return CLIPSegForImageSegmentation(cfg).eval(), CLIPSegProcessor(image_processor=images, tokenizer=tokenizer)
