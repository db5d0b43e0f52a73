"""Compound scaling (EfficientNet): depth, width and resolution grow together with one knob, phi.

    depth d = alpha ** phi, width w = beta ** phi, resolution r = gamma ** phi
    (alpha=1.2, beta=1.1, gamma=1.15, chosen so that alpha * beta**2 * gamma**2 ~ 2: each step of
    phi about doubles the FLOPs)

conf/scaling/custom.yaml computes these with the ``compound`` resolver registered here; OmegaConf
has no arithmetic of its own. Importing ``cnnlab`` (any entry script does) registers it, before
any config is resolved.
"""

from __future__ import annotations

from omegaconf import OmegaConf


def compound(base: float, coefficient: float, phi: float) -> float | int:
    """``base * coefficient ** phi``; an int base (a resolution in px) gives an int."""
    scaled = base * coefficient ** phi
    return round(scaled) if isinstance(base, int) else round(scaled, 6)  # 1.21, not 1.2100000000000002


OmegaConf.register_new_resolver("compound", compound, replace=True)
