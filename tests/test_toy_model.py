"""The shipped toy-sdxl obeys its prompts, and wrong maths shows up as wrong pictures.

Every shape x colour x background prompt of the shapes world is rendered over several seeds and
scored with examples/shape_checker.py (colour by hue, shape by rotational symmetry, background by
the border). The same scoring makes cheap semantic tests of the pipeline: every sampler must give
the asked colour, and conditioning in the wrong order must not.
"""
import dataclasses
import itertools

import pytest
import torch
from training_runs import shape_checker

from models.checkpoints.open import open_model
from trainer.sampling.pipeline import Txt2ImgPipeline
from trainer.sampling.samplers import SAMPLER_NAMES

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = ("red", "green", "blue", "yellow")
BACKGROUNDS = ("white", "black", "grey")
COMBOS = list(itertools.product(SHAPES, COLOURS, BACKGROUNDS))
SEEDS = 2
"""Images per prompt in the obedience test (seeds 100, 101, ... per image)."""


@pytest.fixture(scope="module")
def toy():
    torch.set_num_threads(1)
    return open_model("toy-sdxl")


@pytest.fixture(scope="module")
def classify():
    return shape_checker().classify


def _prompt(shape: str, colour: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def _render(bundle, prompts, n=1, seed=100, **kwargs):
    kwargs = {"steps": 20, "guidance_scale": 5.0, **kwargs}
    return Txt2ImgPipeline(bundle)(prompts, seed=seed, width=64, height=64, n=n, progress=False, **kwargs)


def test_toy_obeys_every_prompt(toy, classify):
    images = _render(toy, [_prompt(*c) for c in COMBOS], n=SEEDS)
    verdicts = [classify(img) for img in images]
    truth = [c for c in COMBOS for _ in range(SEEDS)]
    score = {k: sum(getattr(v, k) == t[i] for v, t in zip(verdicts, truth)) / len(truth)
             for i, k in enumerate(("shape", "colour", "background"))}
    # Measured at these seeds: colour 1.00, shape .90, background 1.00 (chance: .25, .25, .33).
    assert score["colour"] >= 0.95 and score["shape"] >= 0.8 and score["background"] >= 0.95, score
    for colour in COLOURS:  # every colour is reachable, not one carried by the others
        got = [v.colour for v, t in zip(verdicts, truth) if t[1] == colour]
        assert got.count(colour) / len(got) >= 0.9, (colour, got)
    for shape in SHAPES:  # and every shape (stars, the hardest, measured .58 here)
        got = [v.shape for v, t in zip(verdicts, truth) if t[0] == shape]
        assert got.count(shape) / len(got) >= (0.4 if shape == "star" else 0.85), (shape, got)


def test_every_sampler_draws_the_asked_colour(toy, classify):
    """A sampler that is subtly wrong (a sigma off by a step, a wrong derivative) draws the wrong
    picture: each must give the asked colour and shape about as often as euler does."""
    prompts = [_prompt("square", c, b) for c in COLOURS for b in BACKGROUNDS]
    right = {}
    for sampler in SAMPLER_NAMES:
        verdicts = [classify(img) for img in _render(toy, prompts, sampler=sampler)]
        right[sampler] = sum(v.colour == p.split()[1] and v.shape == "square" for v, p in zip(verdicts, prompts))
    assert min(right.values()) >= 10, right  # of 12 (measured: 12 for each); chance is 3 for colour alone


def test_conditioning_in_the_wrong_order_loses_the_prompt(toy, classify):
    """The two towers' context in swapped order (bigG's features first) must wreck colour obedience:
    the picture, not a number, tells that the order matters and that ours is the trained one."""
    prompts = [_prompt("circle", c, "grey") for c in COLOURS for _ in range(2)]
    family = type(toy.spec)

    @dataclasses.dataclass(frozen=True)
    class SwappedContext(family):
        def encode(self, bundle, token_ids):
            cond = super().encode(bundle, token_ids)
            width = bundle.text_encoders[0].config.hidden_size  # CLIP-L's part comes first
            ctx = cond["context"]
            return {**cond, "context": torch.cat([ctx[..., width:], ctx[..., :width]], dim=-1)}

    def right(bundle):
        return sum(classify(img).colour == p.split()[1] for img, p in zip(_render(bundle, prompts), prompts))

    assert right(toy) >= 7, "measured 8 of 8"
    spec = toy.spec
    toy.spec = SwappedContext(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)})
    try:
        assert right(toy) <= 4
    finally:
        toy.spec = spec
