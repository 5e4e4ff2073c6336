"""Every registered attack, in the order `unlearn ls attacks` lists them. One module per attack."""

from __future__ import annotations

from .adversarial_prompt import AdversarialPrompt
from .concept_inversion import ConceptInversion
from .feature_probe import FeatureProbe
from .latent_inversion import LatentInversion
from .latent_search import LatentSearch
from .random_latents import RandomLatents
from .random_prompt import RandomPrompt
from .relearn import Relearn
from .seed_search import SeedSearch
from .token_search import TokenSearch
from .ulira import ULiRA

ALL: list = [
    # every family
    Relearn,
    # classifiers
    FeatureProbe,
    ULiRA,
    # diffusion models
    AdversarialPrompt,
    TokenSearch,
    ConceptInversion,
    RandomPrompt,
    SeedSearch,
    # GANs
    LatentInversion,
    LatentSearch,
    RandomLatents,
]
