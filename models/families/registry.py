"""The family registry: name -> `FamilySpec`. Built-in families register on import of
`models.families`; a plug-in family registers itself with `register_family`."""
from __future__ import annotations

from .base import FamilySpec

FAMILIES: dict[str, FamilySpec] = {}
"""Every registered family by name (built-ins: sd15, sd2, sdxl, tiny-sd15, tiny-sdxl)."""


def register_family(spec: FamilySpec, *, replace: bool = False) -> FamilySpec:
    """Add `spec` to the registry (and return it). Re-registering a name needs `replace=True`."""
    if not isinstance(spec, FamilySpec):
        raise TypeError(f"register_family expects a FamilySpec, got {type(spec).__name__}")
    if spec.name in FAMILIES and not replace and FAMILIES[spec.name] is not spec:
        raise ValueError(f"model family {spec.name!r} is already registered (pass replace=True to redefine it)")
    FAMILIES[spec.name] = spec
    return spec


def unregister_family(name: str) -> None:
    """Remove a family (for plug-ins registered for a while, e.g. in tests)."""
    FAMILIES.pop(name, None)


def family_spec(name: str) -> FamilySpec:
    """The `FamilySpec` for `name`; a clear error lists the known families otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; supported: {', '.join(FAMILIES)}") from None


def lineages() -> dict[str, FamilySpec]:
    """One family per lineage (`base`): the family named after it where there is one, else the
    first registered. Checkpoint and LoRA-file detection works per lineage."""
    out: dict[str, FamilySpec] = {}
    for spec in FAMILIES.values():
        if spec.base not in out or spec.name == spec.base:
            out[spec.base] = spec
    return out


def families_of(base: str, first: str | None = None) -> list[FamilySpec]:
    """Families of lineage `base`, `first` (a family name) leading when it is one of them."""
    specs = [s for s in FAMILIES.values() if s.base == base]
    specs.sort(key=lambda s: s.name != first)
    return specs
