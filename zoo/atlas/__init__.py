"""ATLAS: Titans with the Omega rule, polynomial feature maps and a Muon-style inner optimiser."""

from zoo.atlas.config import AtlasConfig
from zoo.atlas.model import Atlas

__all__ = ["Atlas", "AtlasConfig"]
