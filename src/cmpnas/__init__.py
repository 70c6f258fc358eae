"""cmpnas: compatibility-aware heterogeneous visual search (BCT + CMP-NAS)."""

__version__ = "0.1.0"
