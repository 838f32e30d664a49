"""Move every parameter of a module off its initial value.

At init many encodings are special cases (zero gates, RoPE frequencies, unit norm weights), so a
test run there can pass by accident; perturbed, every gate, frequency, slope and norm weight
depends on content and on the parameter, and a dropped or misplaced one changes the outputs.
"""
import torch


def perturb_parameters(module: torch.nn.Module, std: float) -> torch.nn.Module:
    """Adds std * N(0, 1) to every parameter, in place, from torch's global generator."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn_like(p))
    return module
