"""Model families as plug-ins: each module here defines and registers the families of one lineage.

    from models.families import FAMILIES, family_spec, register_family
    register_family(MyFamily(name="my-family", ...))   # then build_model("my-family") works

See `base.FamilySpec` for what a family declares.
"""
from .base import FamilySpec
from .registry import FAMILIES, families_of, family_spec, lineages, register_family, unregister_family
from . import flux, sd15, sd2, sdxl  # noqa: E402,F401  (built-in families register themselves)

__all__ = ["FAMILIES", "FamilySpec", "families_of", "family_spec", "lineages", "register_family",
           "unregister_family"]
