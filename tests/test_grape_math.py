"""The paper's mathematical claims, each checked against an independent computation.

The references here are built by hand (explicit 2x2 rotation matrices, explicit loops over
paths, torch.linalg.matrix_exp) rather than by calling the code under test twice.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from modeling.attention import dense_logits
from grape import (ALiBi, FoX, GrapeA, GrapeAP, GrapeM, GrapeMContextual, RoPE, alibi_slopes, rank2_generator,
                   rodrigues_apply, rodrigues_exp)
from modeling.bias import path_integral_sum
from model import GPTConfig
from perturbation import perturb_parameters

B, H, T, D, C = 2, 4, 12, 8, 32


def config(pos_encoding="rope", **kw):
    return GPTConfig(n_layer=1, n_head=H, n_embd=C, head_dim=D, vocab_size=64, block_size=256,
                     pos_encoding=pos_encoding, **kw)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=g)
    q = torch.randn(B, H, T, D, generator=g)
    k = torch.randn(B, H, T, D, generator=g)
    return x, q, k


def logits(enc, x, q, k, offset=0, **kw):
    q2, k2, bias = enc(x, q, k, offset=offset, **kw)
    return dense_logits(q2, k2, bias)


def rotation_matrix(angles):
    """Block-diagonal matrix of 2x2 rotations [[cos, -sin], [sin, cos]], built entry by entry."""
    d = 2 * angles.shape[-1]
    G = torch.zeros(d, d, dtype=torch.float64)
    for i, a in enumerate(angles.tolist()):
        c, s = math.cos(a), math.sin(a)
        G[2 * i, 2 * i], G[2 * i, 2 * i + 1] = c, -s
        G[2 * i + 1, 2 * i], G[2 * i + 1, 2 * i + 1] = s, c
    return G


def rope_theta(d, base=10000.0):
    return torch.tensor([base ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)


def map_matrix(enc, n, **kw):
    """G(n) of a multiplicative encoding, read off by rotating the basis vectors at position n."""
    eye = torch.eye(D).view(D, 1, 1, D).expand(D, H, 1, D).contiguous()
    x = torch.zeros(D, 1, C)
    q2, _, _ = enc(x, eye, eye, offset=n, **kw)
    return q2[:, 0, 0, :].T.double()          # column i = G(n) e_i (head 0)


# ---- relative law ------------------------------------------------------------------------

RELATIVE = ["rope", "grape_m", "grape_m_ctx", "grape_m_basis", "grape_m_nc", "alibi", "fox",
            "grape_a_q", "grape_a_k", "grape_a_qk", "rope+grape_a_qk", "grape_m_nc+alibi", "grape_m_ctx+fox"]
PERIOD = 16


def perturbed(name, seed=0):
    """An encoding with every parameter moved off its initial value: gates, phases and
    frequencies all depend on content and on the parameters."""
    from grape import build_encoding
    torch.manual_seed(seed)
    enc = build_encoding(config(name))
    perturb_parameters(enc, 0.5)
    return enc


def periodic_inputs(repeats=3, seed=0):
    """x, q, k whose content repeats with period PERIOD: the token pair (t, j) and the pair
    (t + PERIOD, j + PERIOD) carry the same content, and so does every token between them."""
    g = torch.Generator().manual_seed(seed)
    one = (torch.randn(B, PERIOD, C, generator=g), torch.randn(B, H, PERIOD, D, generator=g),
           torch.randn(B, H, PERIOD, D, generator=g))
    return one[0].repeat(1, repeats, 1), one[1].repeat(1, 1, repeats, 1), one[2].repeat(1, 1, repeats, 1)


def scores(enc, x, q, k, offset=0):
    """q̃·k̃/√d + b(t, j) from the encoding's outputs, float64 (B, H, T, T)."""
    q2, k2, bias = enc(x, q, k, offset=offset)
    out = q2.double() @ k2.double().transpose(-1, -2) / math.sqrt(D)
    return out if bias is None else out + bias.dense().double()


def relative_law_error(enc):
    """Largest change of a visible logit when the whole path (j..t) moves by PERIOD positions
    inside one sequence, or when the sequence starts at another absolute offset."""
    x, q, k = periodic_inputs()
    n = x.shape[1] - PERIOD
    keep = causal(n)
    base = scores(enc, x, q, k)
    moved = (base[..., PERIOD:, PERIOD:] - base[..., :n, :n])[..., keep].abs().max()
    shifted = (scores(enc, x, q, k, offset=29) - base)[..., causal(x.shape[1])].abs().max()
    return max(moved.item(), shifted.item())


class AbsolutePositionLeak(torch.nn.Module):
    """A deliberately broken encoding: ``enc``, then one term that sees absolute positions.
    "query": queries only get an extra rotation by angle 0.05 t (keys do not), as if one side
    of a rotary map had been forgotten; "bias": the additive bias is scaled by 1 + t / 100,
    a slope that grows with the absolute query position."""

    def __init__(self, enc, where):
        super().__init__()
        self.enc, self.where = enc, where

    def forward(self, x, q, k, offset=0):
        q2, k2, bias = self.enc(x, q, k, offset=offset)
        t = torch.arange(offset, offset + q.shape[2], dtype=torch.float32)
        if self.where == "query":
            angle = 0.05 * t[:, None].expand(-1, D // 2)
            q2 = torch.stack((q2[..., 0::2] * angle.cos() - q2[..., 1::2] * angle.sin(),
                              q2[..., 0::2] * angle.sin() + q2[..., 1::2] * angle.cos()), -1).flatten(-2)
            return q2, k2, bias
        return q2, k2, FixedBias(bias.dense() * (1 + t[:, None] / 100))


class FixedBias:
    def __init__(self, dense):
        self._dense = dense

    def dense(self):
        return self._dense


@pytest.mark.parametrize("name", RELATIVE)
def test_relative_law_logits_depend_only_on_content_and_relative_position(name):
    """§2.2/§4 (exact relative law), with content-dependent gates: a logit is unchanged when the
    content of the path j..t is moved PERIOD positions later in the same sequence, or when the
    sequence is shifted by an offset. The same check fails on broken variants of the encoding
    that see absolute positions, and positions do matter (same content, other distance)."""
    enc = perturbed(name)
    assert relative_law_error(enc) < 2e-4
    x, q, k = periodic_inputs()
    base = scores(enc, x, q, k)
    # the same (q_t, k_j) contents at distance t - j and at t - j + PERIOD give different logits
    farther = (base[..., 2 * PERIOD:, PERIOD:2 * PERIOD] - base[..., 2 * PERIOD:, :PERIOD]).abs().max()
    assert farther > 1e-2
    for where in ("query", "bias") if enc.additive else ("query",):
        assert relative_law_error(AbsolutePositionLeak(enc, where)) > 1e-2, where


def test_rope_logits_follow_relative_rotation_formula():
    """q̃_t·k̃_j = q_tᵀ R((j - t)θ) k_j (§2.5), with R built by hand."""
    enc = RoPE(config("rope"))
    x, q, k = inputs()
    got = logits(enc, x, q, k, offset=3)
    theta = rope_theta(D)
    for t in (0, 5, 11):
        for j in range(t + 1):
            R = rotation_matrix((j - t) * theta)
            ref = q[0, 1, t].double() @ R @ k[0, 1, j].double() / math.sqrt(D)
            assert abs(got[0, 1, t, j].item() - ref.item()) < 1e-4


def test_grape_m_ctx_logits_depend_on_phase_difference():
    """Contextual GRAPE-M: q̃_t·k̃_j = q_tᵀ R((Φ_j - Φ_t)θ) k_j, Φ_t = Σ_{ℓ<t} ω_ℓ computed by a loop."""
    torch.manual_seed(1)
    enc = GrapeMContextual(config("grape_m_ctx"))
    with torch.no_grad():
        enc.phase_proj.weight.normal_(0, 3.0)   # make ω content-dependent
    x, q, k = inputs()
    got = logits(enc, x, q, k)
    w, b = enc.phase_proj.weight[0].double(), enc.phase_proj.bias[0].double()
    theta = rope_theta(D)
    for bi in range(B):
        omega = [torch.sigmoid((x[bi, t].double() @ w + b) / 16.0).item() for t in range(T)]
        phi = [sum(omega[:t]) for t in range(T)]
        for t in (2, 9):
            for j in range(t + 1):
                R = rotation_matrix((phi[j] - phi[t]) * theta)
                ref = q[bi, 2, t].double() @ R @ k[bi, 2, j].double() / math.sqrt(D)
                assert abs(got[bi, 2, t, j].item() - ref.item()) < 1e-4
    # and a common phase offset changes nothing
    torch.testing.assert_close(logits(enc, x, q, k, phase_offset=13.5), got, atol=2e-4, rtol=1e-4)


# ---- multiplicative maps: orthogonality, norm preservation, one-parameter group ---------

def multiplicative_maps():
    torch.manual_seed(2)
    rope = RoPE(config("rope"))
    gm = GrapeM(config("grape_m", grape_m_per_head=True))
    with torch.no_grad():
        gm.scaled_log_freq.add_(torch.randn_like(gm.scaled_log_freq) * 3.0)
    ctx = GrapeMContextual(config("grape_m_ctx"))
    # the contextual map at phase Φ is the RoPE map at "position" Φ: evaluate it with x = 0
    # (ω = const) and read G from the phase offset
    return {"rope": (rope, {}), "grape_m": (gm, {})}, ctx


@pytest.mark.parametrize("name", ["rope", "grape_m"])
def test_multiplicative_map_is_orthogonal_and_a_one_parameter_group(name):
    maps, _ = multiplicative_maps()
    enc, kw = maps[name]
    for n, m in ((3, 5), (17, 40), (0, 9)):
        Gn, Gm, Gnm = map_matrix(enc, n), map_matrix(enc, m), map_matrix(enc, n + m)
        eye = torch.eye(D, dtype=torch.float64)
        torch.testing.assert_close(Gn.T @ Gn, eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(Gnm, Gn @ Gm, atol=1e-4, rtol=0)
        assert abs(torch.linalg.det(Gn).item() - 1) < 1e-5
        v = torch.randn(D, dtype=torch.float64)
        assert abs((Gn @ v).norm().item() - v.norm().item()) < 1e-5
    torch.testing.assert_close(map_matrix(enc, 0), torch.eye(D, dtype=torch.float64), atol=0, rtol=0)


def test_contextual_map_preserves_norms_and_composes_in_phase():
    _, ctx = multiplicative_maps()

    def G(phase):
        eye = torch.eye(D).view(D, 1, 1, D).expand(D, H, 1, D).contiguous()
        q2, _, _ = ctx(torch.zeros(D, 1, C), eye, eye, phase_offset=phase)
        return q2[:, 0, 0, :].T.double()
    a, b = 2.75, 11.5
    eye = torch.eye(D, dtype=torch.float64)
    torch.testing.assert_close(G(a).T @ G(a), eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(G(a + b), G(a) @ G(b), atol=1e-4, rtol=0)
    _, q, k = inputs()
    x = torch.randn(B, T, C)
    q2, k2, _ = ctx(x, q, k)
    torch.testing.assert_close(q2.norm(dim=-1), q.norm(dim=-1), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(k2.norm(dim=-1), k.norm(dim=-1), atol=1e-4, rtol=1e-5)


MULTIPLICATIVE = ["rope", "grape_m", "grape_m_ctx", "grape_m_basis", "grape_m_nc"]


def position_map(enc, n):
    """G(n) of every head as explicit (H, D, D) matrices: the encoding applied to the basis
    vectors e_i at position n (GRAPE-M-ctx: at phase n, through its phase offset)."""
    eye = torch.eye(D).view(D, 1, 1, D).expand(D, H, 1, D).contiguous()
    x = torch.zeros(D, 1, C)
    if isinstance(enc, GrapeMContextual):
        out, _, _ = enc(x, eye, eye, phase_offset=float(n))
    else:
        out, _, _ = enc(x, eye, eye, offset=n)
    return out[:, :, 0, :].permute(1, 2, 0).double()           # [h][:, i] = G_h(n) e_i


@pytest.mark.parametrize("name", MULTIPLICATIVE)
def test_map_at_negative_position_is_the_transpose(name):
    """§2.2: G(-n) = G(n)ᵀ (= G(n)⁻¹), for every multiplicative encoding with perturbed
    parameters (frequencies, learned basis, non-commuting planes, phase gates)."""
    enc = perturbed(name)
    for n in (1, 5, 37, 300):
        G, G_neg = position_map(enc, n), position_map(enc, -n)
        assert (G - G.transpose(-1, -2)).abs().max() > 0.1        # not trivially symmetric
        atol = 1e-5 + 3e-7 * n          # float32 angles and matrix_exp(nL) round to ~n ulp
        torch.testing.assert_close(G_neg, G.transpose(-1, -2), atol=atol, rtol=0)
        torch.testing.assert_close(G_neg @ G, torch.eye(D, dtype=torch.float64).expand(H, D, D),
                                   atol=atol, rtol=0)


def test_rope_is_product_of_rank2_exponentials_on_coordinate_planes():
    """Prop. 3.1: G(n) = Π_i exp(n θ_i U_i J U_iᵀ) with matrix_exp, equals the RoPE map."""
    enc = RoPE(config("rope"))
    theta = rope_theta(D)
    J = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    for n in (1, 6, 33):
        G = torch.eye(D, dtype=torch.float64)
        for i in range(D // 2):
            U = torch.zeros(D, 2, dtype=torch.float64)
            U[2 * i, 0] = U[2 * i + 1, 1] = 1.0
            G = G @ torch.linalg.matrix_exp(n * theta[i] * (U @ J @ U.T))
        torch.testing.assert_close(map_matrix(enc, n), G, atol=1e-5, rtol=0)


def test_grape_m_at_initial_frequencies_equals_rope_exactly():
    from model import GPT
    torch.manual_seed(3)
    rope = GPT(GPTConfig(n_layer=2, n_head=H, n_embd=C, vocab_size=64, block_size=64, pos_encoding="rope"))
    grape = GPT(GPTConfig(n_layer=2, n_head=H, n_embd=C, vocab_size=64, block_size=64, pos_encoding="grape_m"))
    missing, unexpected = grape.load_state_dict(rope.state_dict(), strict=False)
    assert unexpected == [] and all("scaled_log_freq" in m for m in missing)
    for p in grape.parameters():
        if p.dim() == 1 and p.shape[0] == D // 2:
            p.requires_grad_(False)          # frozen frequencies
    idx = torch.randint(0, 64, (2, 40))
    assert torch.equal(rope(idx)[0], grape(idx)[0])


# ---- rank-2 closed form ------------------------------------------------------------------

@pytest.mark.parametrize("scale", [1.0, 1e-2, 1e-5, 0.0])
def test_rodrigues_closed_form_matches_matrix_exp(scale):
    g = torch.Generator().manual_seed(4)
    d = 7
    a = torch.randn(d, generator=g, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64) * scale + (0.3 * a if scale == 0 else 0)
    x = torch.randn(d, generator=g, dtype=torch.float64)
    L = a[:, None] * b[None, :] - b[:, None] * a[None, :]
    for n in (1.0, 2.5, -4.0):
        ref = torch.linalg.matrix_exp(n * L)
        torch.testing.assert_close(rodrigues_exp(a, b, n), ref, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(rodrigues_apply(a, b, x, n), ref @ x, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("plane", [1e-9, 1e-4, 3e-4, 1e-2, 1.0])
def test_rodrigues_gradients_match_matrix_exp_autograd_and_finite_differences(plane):
    """Gradients of y = exp(cL(a, b)) x with respect to a, b, x and c, on both sides of the
    series switch (c s ≈ 1e-3 for s = 3.3e-4) and at a near-degenerate plane (s = 1e-9):
    equal to autograd through torch.linalg.matrix_exp (float64) and to central differences."""
    g = torch.Generator().manual_seed(11)
    a = torch.randn(5, generator=g, dtype=torch.float64)
    direction = torch.randn(5, generator=g, dtype=torch.float64)
    direction -= (direction @ a) / (a @ a) * a
    b = 0.7 * a + plane * direction / direction.norm() / a.norm()         # s = plane
    x = torch.randn(5, generator=g, dtype=torch.float64)
    c = torch.tensor(3.0, dtype=torch.float64)
    w = torch.randn(5, generator=g, dtype=torch.float64)                    # loss = w · y

    def via_rodrigues(a, b, x, c):
        return w @ rodrigues_apply(a, b, x, c)

    def via_matrix_exp(a, b, x, c):
        L = a[:, None] * b[None, :] - b[:, None] * a[None, :]
        return w @ (torch.linalg.matrix_exp(c * L) @ x)

    leaves = [t.clone().requires_grad_() for t in (a, b, x, c)]
    got = torch.autograd.grad(via_rodrigues(*leaves), leaves)
    leaves = [t.clone().requires_grad_() for t in (a, b, x, c)]
    want = torch.autograd.grad(via_matrix_exp(*leaves), leaves)
    for name, g_got, g_want in zip("abxc", got, want):
        torch.testing.assert_close(g_got, g_want, atol=1e-10, rtol=1e-8, msg=lambda m: f"d/d{name}: {m}")
    eps = 1e-6
    args = [a, b, x, c]
    for i, name in enumerate("abxc"):
        for e in range(args[i].numel()):
            plus = [t.clone() for t in args]
            minus = [t.clone() for t in args]
            plus[i].view(-1)[e] += eps
            minus[i].view(-1)[e] -= eps
            fd = (via_rodrigues(*plus) - via_rodrigues(*minus)) / (2 * eps)
            assert abs(fd - got[i].view(-1)[e]) < 1e-7, (name, e, fd.item(), got[i].view(-1)[e].item())


def test_rodrigues_exp_is_orthogonal_rotation_in_the_plane():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(2, 6, generator=g, dtype=torch.float64)
    G = rodrigues_exp(a, b, 1.7)
    torch.testing.assert_close(G.T @ G, torch.eye(6, dtype=torch.float64), atol=1e-12, rtol=0)
    # identity on the orthogonal complement of span{a, b}
    Q, _ = torch.linalg.qr(torch.stack([a, b], 1), mode="complete")
    w = Q[:, 2]
    torch.testing.assert_close(G @ w, w, atol=1e-12, rtol=0)
    assert torch.allclose(rank2_generator(a, b), -rank2_generator(a, b).T)


def canonical_complex_structure(d):
    """J = ⊕ [[0, -1], [1, 0]] (§2.1): J ᵀ = -J, J² = -I; a⊥ = J a is a rotated by 90° per block."""
    J = torch.zeros(d, d, dtype=torch.float64)
    for i in range(d // 2):
        J[2 * i + 1, 2 * i], J[2 * i, 2 * i + 1] = 1.0, -1.0
    return J


@pytest.mark.parametrize("norm", [1.0, 0.4, 2.5])
def test_b_equals_Ja_gives_a_plane_rotation_at_frequency_omega_times_norm_squared(norm):
    """§2.4, Corollary 2.1: with b = J a, γ = 0, β = α, s = α; exp(ωL(a, Ja)) is the rotation by
    ω_eff = ω‖a‖² in the plane (a, Ja) and the identity on its complement. Checked against
    torch.linalg.matrix_exp, a hand-written 2x2 rotation in the basis (â, Jâ), and the
    closed forms rodrigues_exp / rodrigues_apply."""
    d, omega = 6, 0.37
    g = torch.Generator().manual_seed(12)
    a = torch.randn(d, generator=g, dtype=torch.float64)
    a = norm * a / a.norm()
    J = canonical_complex_structure(d)
    torch.testing.assert_close(J @ J, -torch.eye(d, dtype=torch.float64))
    b = J @ a
    alpha, beta, gamma = a @ a, b @ b, a @ b
    assert abs(gamma.item()) < 1e-15 and abs(beta.item() - alpha.item()) < 1e-12
    s = torch.sqrt(alpha * beta - gamma ** 2)
    torch.testing.assert_close(s, alpha)                                        # s = α = ‖a‖²
    L = rank2_generator(a, b)
    torch.testing.assert_close(L @ a, -alpha * b)                               # L a = -(Ja) α
    torch.testing.assert_close(L @ b, alpha * a)                                # L Ja = α a
    for n in (1.0, 4.0, -3.0):
        G = torch.linalg.matrix_exp(n * omega * L)
        angle = n * omega * norm ** 2                                           # n ω_eff
        U = torch.stack([a, b], 1) / a.norm()                                   # orthonormal (â, Jâ)
        R = torch.tensor([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]],
                         dtype=torch.float64)                                   # rotation by -angle
        torch.testing.assert_close(U.T @ G @ U, R, atol=1e-12, rtol=0)
        P = U @ U.T
        w = (torch.eye(d, dtype=torch.float64) - P) @ torch.randn(d, generator=g, dtype=torch.float64)
        torch.testing.assert_close(G @ w, w, atol=1e-12, rtol=0)
        # the paper's closed form: exp(nωL) = I - (1 - cos nωα) P_U - sin(nωα) J P_U
        closed = torch.eye(d, dtype=torch.float64) - (1 - math.cos(angle)) * P - math.sin(angle) * J @ P
        torch.testing.assert_close(G, closed, atol=1e-12, rtol=0)
        torch.testing.assert_close(rodrigues_exp(a, b, n * omega), G, atol=1e-12, rtol=0)
        x = torch.randn(d, generator=g, dtype=torch.float64)
        torch.testing.assert_close(rodrigues_apply(a, b, x, n * omega), G @ x, atol=1e-12, rtol=0)
    # the scale of a is absorbed into ω: exp(ωL(ca, Jca)) = exp(c²ωL(a, Ja))
    unit = a / a.norm()
    torch.testing.assert_close(torch.linalg.matrix_exp(omega * L),
                               torch.linalg.matrix_exp(omega * norm ** 2 * rank2_generator(unit, J @ unit)),
                               atol=1e-12, rtol=0)


# ---- additive encodings --------------------------------------------------------------------

def alibi_bias_by_hand(n_head, T, slope_scale=1.0):
    m = alibi_slopes(n_head).double() * slope_scale
    t = torch.arange(T)
    return -(m[:, None, None] * (t[:, None] - t[None, :]).double())


def causal(T):
    return torch.tril(torch.ones(T, T, dtype=torch.bool))


def test_alibi_slopes_follow_the_geometric_rule():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** (-(i + 1)) for i in range(8)]))
    # H = 6: the 4 slopes of H = 4, then every other slope of H = 8
    expected = [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]
    assert torch.allclose(alibi_slopes(6), torch.tensor(expected))


def test_alibi_bias_is_minus_slope_times_distance():
    enc = ALiBi(config("alibi"))
    x, q, k = inputs()
    _, _, bias = enc(x, q, k, offset=5)
    torch.testing.assert_close(bias.dense()[0].double()[:, causal(T)], alibi_bias_by_hand(H, T)[:, causal(T)])


@pytest.mark.parametrize("gates,n_terms", [("q", 1), ("k", 1), ("qk", 2)])
def test_alibi_is_constant_gate_grape_a(gates, n_terms):
    """§4.2: with zero gate vectors λ = softplus(0) = log 2; choosing softplus(ω̂)·n·log 2 = 1
    turns GRAPE-A into ALiBi exactly."""
    enc = GrapeA(config("grape_a_" + gates), gates)
    with torch.no_grad():
        for name in ("gate_q", "gate_k"):
            if hasattr(enc, name):
                getattr(enc, name).zero_()
        enc.omega_raw.fill_(math.log(math.expm1(1.0 / (n_terms * math.log(2.0)))))
    x, q, k = inputs()
    _, _, bias = enc(x, q, k)
    got = bias.dense().double()
    ref = alibi_bias_by_hand(H, T).expand_as(got)
    torch.testing.assert_close(got[..., causal(T)], ref[..., causal(T)], atol=1e-5, rtol=1e-5)


def test_grape_a_qk_bias_matches_equation_4_6():
    torch.manual_seed(6)
    enc = GrapeA(config("grape_a_qk"), "qk")
    x, q, k = inputs()
    _, _, bias = enc(x, q, k)
    got = bias.dense()
    omega = F.softplus(enc.omega_raw).double() * alibi_slopes(H).double()
    u = enc.gate_k.double() / enc.gate_k.double().norm(dim=-1, keepdim=True)
    v = enc.gate_q.double() / enc.gate_q.double().norm(dim=-1, keepdim=True)
    for h in (0, 3):
        for t in (4, 11):
            for j in range(t + 1):
                lam_q = F.softplus(v[h] @ q[1, h, t].double() / math.sqrt(D))
                lam_k = F.softplus(u[h] @ k[1, h, j].double() / math.sqrt(D))
                ref = (j - t) * omega[h] * (lam_q + lam_k)
                assert abs(got[1, h, t, j].item() - ref.item()) < 1e-5


def path_sum_by_loops(psi, T):
    """b(t, j) = Σ_{ℓ=j+1..t} psi[t][ℓ], written as the paper's loop."""
    out = torch.zeros(T, T, dtype=torch.float64)
    for t in range(T):
        for j in range(t + 1):
            out[t, j] = sum(psi[t][l] for l in range(j + 1, t + 1))
    return out


def test_path_integral_sum_matches_explicit_loops():
    g = torch.Generator().manual_seed(7)
    psi = -torch.rand(T, T, generator=g, dtype=torch.float64)
    pos = torch.arange(T)
    got = path_integral_sum(psi, pos, pos)
    ref = path_sum_by_loops(psi.tolist(), T)
    torch.testing.assert_close(got[causal(T)], ref[causal(T)])
    assert (got.diagonal() == 0).all()


def test_alibi_is_endpoint_independent_grape_ap():
    """§5: ψ(t, ℓ) ≡ -m_h makes the path-integral bias ALiBi's."""
    pos = torch.arange(T)
    m = alibi_slopes(H).double()
    psi = -m.view(H, 1, 1).expand(H, T, T)
    got = path_integral_sum(psi, pos, pos)
    torch.testing.assert_close(got[:, causal(T)], alibi_bias_by_hand(H, T)[:, causal(T)])


def test_grape_ap_with_zero_probes_is_alibi_with_slope_log2():
    """With p ≡ 0, ψ = m_h·logsigmoid(0) = -m_h log 2 for every edge: ALiBi scaled by log 2."""
    enc = GrapeAP(config("grape_ap"))
    with torch.no_grad():
        enc.p_proj.weight.zero_()
    x, q, k = inputs()
    _, _, bias = enc(x, q, k, offset=9)
    got = bias.dense().double()
    ref = alibi_bias_by_hand(H, T, math.log(2.0)).expand_as(got)
    torch.testing.assert_close(got[..., causal(T)], ref[..., causal(T)], atol=1e-5, rtol=1e-5)


def test_fox_is_grape_ap_with_log_forget_edges():
    """Appendix C: FoX's bias is the path integral of ψ(t, ℓ) = log f_ℓ."""
    torch.manual_seed(8)
    enc = FoX(config("fox"))
    x, q, k = inputs()
    _, _, bias = enc(x, q, k)
    got = bias.dense().double()
    W, b = enc.forget_proj.weight.double(), enc.forget_proj.bias.double()
    for bi in range(B):
        for h in (0, 2):
            log_f = [F.logsigmoid(x[bi, l].double() @ W[h] + b[h]).item() for l in range(T)]
            ref = path_sum_by_loops([log_f] * T, T)
            torch.testing.assert_close(got[bi, h][causal(T)], ref[causal(T)], atol=1e-5, rtol=1e-5)


def test_grape_ap_bias_matches_definition_5_1():
    """ψ_h(t, ℓ) = m_h logsigmoid(⟨p_t, R_ℓ p̂_ℓ⟩ / d_p), R_ℓ rotating every plane by ℓ."""
    torch.manual_seed(9)
    enc = GrapeAP(config("grape_ap", p_head_dim=4))
    x, q, k = inputs()
    offset = 3
    _, _, bias = enc(x, q, k, offset=offset)
    got = bias.dense().double()
    dp = 4
    W = enc.p_proj.weight.double().view(H, dp, C)
    m = alibi_slopes(H).double()
    bi, h = 1, 2
    p = [W[h] @ x[bi, l].double() for l in range(T)]
    p_hat = [v / torch.sqrt((v * v).mean() + 1e-6) for v in p]
    r = [rotation_matrix(torch.full((dp // 2,), float(l + offset), dtype=torch.float64)) @ p_hat[l]
         for l in range(T)]
    psi = [[m[h].item() * F.logsigmoid((p[t] @ r[l]) / dp).item() for l in range(T)] for t in range(T)]
    ref = path_sum_by_loops(psi, T)
    torch.testing.assert_close(got[bi, h][causal(T)], ref[causal(T)], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tie", ["pq", "pk", "pv"])
def test_grape_ap_tied_probe_reuses_q_k_or_v(tie):
    enc = GrapeAP(config("grape_ap", p_tie_mode=tie))
    x, q, k = inputs()
    v = torch.randn_like(q)
    _, _, bias = enc(x, q, k, v=v)
    assert torch.equal(bias.p, {"pq": q, "pk": k, "pv": v}[tie])
