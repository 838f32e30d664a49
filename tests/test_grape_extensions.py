"""Forms the paper describes beyond the original code (SPEC §6): learned orthogonal basis,
non-commuting thin-Schur GRAPE-M, and multiplicative + additive composition."""
import math

import pytest
import torch

from attention import dense_logits
from grape import GrapeMLearnedBasis, GrapeMNonCommuting, build_encoding, rope_frequencies
from model import GPTConfig

B, H, T, D, C = 2, 2, 10, 8, 16


def config(pos_encoding, **kw):
    return GPTConfig(n_layer=1, n_head=H, n_embd=C, head_dim=D, vocab_size=64, block_size=256,
                     pos_encoding=pos_encoding, **kw)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, C, generator=g), torch.randn(B, H, T, D, generator=g),
            torch.randn(B, H, T, D, generator=g))


def applied_map(enc, n, head):
    """G(n) of head ``head``, read off by transforming basis vectors at position n."""
    eye = torch.eye(D).view(D, 1, 1, D).expand(D, H, 1, D).contiguous()
    out, _, _ = enc(torch.zeros(D, 1, C), eye, eye, offset=n)
    return out[:, head, 0, :].T.double()


def noncommuting():
    torch.manual_seed(1)
    return GrapeMNonCommuting(config("grape_m_nc", grape_nc_planes=3))


def test_noncommuting_generators_really_do_not_commute():
    enc = noncommuting()
    a = torch.nn.functional.normalize(enc.plane_a, dim=-1).double()
    b = torch.nn.functional.normalize(enc.plane_b, dim=-1).double()
    L0 = a[0, 0, :, None] * b[0, 0, None, :] - b[0, 0, :, None] * a[0, 0, None, :]
    L1 = a[0, 1, :, None] * b[0, 1, None, :] - b[0, 1, :, None] * a[0, 1, None, :]
    assert (L0 @ L1 - L1 @ L0).abs().max() > 1e-2


@pytest.mark.parametrize("n", [1, 5, 37])
def test_noncommuting_thin_schur_map_equals_full_matrix_exponential(n):
    """G(n) x = x + E(exp(n L_r) - I)Eᵀx equals matrix_exp(n Σ θ_i L(a_i, b_i)) built from a, b."""
    enc = noncommuting()
    a = torch.nn.functional.normalize(enc.plane_a.detach().double(), dim=-1)
    b = torch.nn.functional.normalize(enc.plane_b.detach().double(), dim=-1)
    theta = enc.log_freq.detach().double().exp()
    for h in range(H):
        L = sum(theta[h, i] * (a[h, i, :, None] * b[h, i, None, :] - b[h, i, :, None] * a[h, i, None, :])
                for i in range(a.shape[1]))
        torch.testing.assert_close(applied_map(enc, n, h), torch.linalg.matrix_exp(n * L), atol=2e-5, rtol=0)


def test_noncommuting_map_is_an_orthogonal_one_parameter_group():
    enc = noncommuting()
    eye = torch.eye(D, dtype=torch.float64)
    for n, m in ((2, 3), (11, 20)):
        Gn, Gm, Gnm = (applied_map(enc, s, 1) for s in (n, m, n + m))
        torch.testing.assert_close(Gn.T @ Gn, eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(Gnm, Gn @ Gm, atol=1e-4, rtol=0)


def test_learned_basis_is_rope_conjugated_by_an_orthogonal_matrix():
    """G(n) = E R(nθ) Eᵀ with E = matrix_exp(S - Sᵀ), R built from 2x2 blocks by hand."""
    torch.manual_seed(3)
    enc = GrapeMLearnedBasis(config("grape_m_basis"))
    with torch.no_grad():
        enc.basis_raw.normal_(0, 0.3)
    S = torch.triu(enc.basis_raw.detach().double()[1], 1)
    E = torch.linalg.matrix_exp(S - S.T)
    theta = rope_frequencies(D, 10000.0).double()
    n = 7
    R = torch.zeros(D, D, dtype=torch.float64)
    for i, a in enumerate((n * theta).tolist()):
        R[2 * i:2 * i + 2, 2 * i:2 * i + 2] = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    # the encoding applies y ↦ (y E) R' Eᵀ to row vectors, i.e. G = E R Eᵀ on column vectors
    torch.testing.assert_close(applied_map(enc, n, 1), E @ R @ E.T, atol=1e-5, rtol=0)


def test_learned_basis_starts_as_rope():
    x, q, k = inputs()
    basis = GrapeMLearnedBasis(config("grape_m_basis"))
    rope = build_encoding(config("rope"))
    got, ref = basis(x, q, k, offset=4), rope(x, q, k, offset=4)
    torch.testing.assert_close(got[0], ref[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(got[1], ref[1], atol=1e-6, rtol=0)


def test_composition_adds_the_additive_bias_to_the_rotary_logits():
    """Eq. 5.3: l = q̃·k̃/√d + b, with the bias computed from the un-rotated q, k."""
    torch.manual_seed(4)
    enc = build_encoding(config("rope+grape_a_qk"))
    x, q, k = inputs()
    q2, k2, bias = enc(x, q, k)
    rope = build_encoding(config("rope"))
    grape_a = build_encoding(config("grape_a_qk"))
    grape_a.load_state_dict(enc.bias.state_dict())
    qr, kr, _ = rope(x, q, k)
    _, _, ref_bias = grape_a(x, q, k)
    torch.testing.assert_close(dense_logits(q2, k2, bias), dense_logits(qr, kr, ref_bias))


def test_composition_must_be_multiplicative_then_additive():
    from model import GPT
    with pytest.raises(ValueError, match="<multiplicative>\\+<additive>"):
        GPT(config("alibi+rope"))
    with pytest.raises(ValueError, match="unknown pos_encoding"):
        config("rope+alibi+fox")
