"""Forms the paper describes beyond the original code (SPEC §6): learned orthogonal basis,
non-commuting thin-Schur GRAPE-M, and multiplicative + additive composition."""
import math

import pytest
import torch

from grape import GrapeMLearnedBasis, GrapeMNonCommuting, build_encoding
from model import GPTConfig
from perturbation import perturb_parameters

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


def rope_map(n):
    """RoPE's G(n) on column vectors, built from 2x2 rotation blocks by hand: pair (2i, 2i+1)
    rotates by n θ_i, θ_i = 10000^(-2i/d)."""
    R = torch.zeros(D, D, dtype=torch.float64)
    for i in range(D // 2):
        a = n * 10000.0 ** (-2 * i / D)
        R[2 * i:2 * i + 2, 2 * i:2 * i + 2] = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return R


def test_learned_basis_is_rope_conjugated_by_an_orthogonal_matrix():
    """G(n) = E R(nθ) Eᵀ with E = matrix_exp(S - Sᵀ), R built from 2x2 blocks by hand."""
    torch.manual_seed(3)
    enc = GrapeMLearnedBasis(config("grape_m_basis"))
    with torch.no_grad():
        enc.basis_raw.normal_(0, 0.3)
    S = torch.triu(enc.basis_raw.detach().double()[1], 1)
    E = torch.linalg.matrix_exp(S - S.T)
    n = 7
    # the encoding applies y ↦ (y E) R' Eᵀ to row vectors, i.e. G = E R Eᵀ on column vectors
    torch.testing.assert_close(applied_map(enc, n, 1), E @ rope_map(n) @ E.T, atol=1e-5, rtol=0)


def test_learned_basis_starts_as_rope():
    """At init (S = 0) the learned-basis map is RoPE's, for every head and position."""
    x, q, k = inputs()
    offset = 4
    q2, k2, _ = GrapeMLearnedBasis(config("grape_m_basis"))(x, q, k, offset=offset)
    for t in range(T):
        G = rope_map(offset + t).float()
        torch.testing.assert_close(q2[:, :, t], q[:, :, t] @ G.T, atol=1e-6, rtol=0)
        torch.testing.assert_close(k2[:, :, t], k[:, :, t] @ G.T, atol=1e-6, rtol=0)


def test_composition_adds_the_additive_bias_to_the_rotary_logits():
    """Eq. 5.3: l(t, j) = q_tᵀ G(j - t) k_j / √d + b(t, j). Reference by hand: G(m) = matrix_exp(m Σ_i θ_i L(a_i, b_i)) from the non-commuting
    planes, and FoX's b(t, j) = Σ_{j<ℓ≤t} log σ(w_h·x_ℓ + c_h) summed in a loop. (That gates
    reading q, k see them un-rotated is checked by the joint GL(d+2) lift in test_grape_lifts.)"""
    torch.manual_seed(4)
    enc = build_encoding(config("grape_m_nc+fox", grape_nc_planes=3))
    perturb_parameters(enc, 0.5)
    x, q, k = inputs()
    offset = 5
    q2, k2, bias = enc(x, q, k, offset=offset)
    got = q2.double() @ k2.double().transpose(-1, -2) / math.sqrt(D) + bias.dense().double()
    nc, fox = enc.rotary, enc.bias
    a = torch.nn.functional.normalize(nc.plane_a.detach().double(), dim=-1)
    b = torch.nn.functional.normalize(nc.plane_b.detach().double(), dim=-1)
    theta = nc.log_freq.detach().double().exp()
    W, c = fox.forget_proj.weight.detach().double(), fox.forget_proj.bias.detach().double()
    for h in range(H):
        L = sum(theta[h, i] * (a[h, i, :, None] * b[h, i, None, :] - b[h, i, :, None] * a[h, i, None, :])
                for i in range(a.shape[1]))
        for bi in range(B):
            log_f = [torch.nn.functional.logsigmoid(W[h] @ x[bi, l].double() + c[h]).item() for l in range(T)]
            for t in range(T):
                for j in range(t + 1):
                    G = torch.linalg.matrix_exp((j - t) * L)
                    ref = q[bi, h, t].double() @ G @ k[bi, h, j].double() / math.sqrt(D) + sum(log_f[j + 1:t + 1])
                    assert abs(got[bi, h, t, j].item() - ref.item()) < 2e-5, (h, bi, t, j)


def test_composition_must_be_multiplicative_then_additive():
    from model import GPT
    with pytest.raises(ValueError, match="<multiplicative>\\+<additive>"):
        GPT(config("alibi+rope"))
    with pytest.raises(ValueError, match="unknown pos_encoding"):
        config("rope+alibi+fox")
