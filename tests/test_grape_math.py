"""The paper's mathematical claims, each checked against an independent computation.

The references here are built by hand (explicit 2x2 rotation matrices, explicit loops over
paths, torch.linalg.matrix_exp) rather than by calling the code under test twice.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from attention import dense_logits
from grape import (ALiBi, FoX, GrapeA, GrapeAP, GrapeM, GrapeMContextual, RoPE, alibi_slopes,
                   path_integral_sum, rank2_generator, rodrigues_apply, rodrigues_exp)
from model import GPTConfig

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

@pytest.mark.parametrize("name", ["rope", "grape_m", "alibi", "grape_a_q", "grape_a_k", "grape_a_qk"])
def test_relative_law_logits_invariant_to_position_shift(name):
    torch.manual_seed(0)
    model_cfg = config(name)
    from grape import build_encoding
    enc = build_encoding(model_cfg)
    if name == "grape_m":  # move off RoPE's spectrum so the check covers learned frequencies
        with torch.no_grad():
            enc.scaled_log_freq.add_(torch.randn_like(enc.scaled_log_freq) * 3.0)
    x, q, k = inputs()
    base = logits(enc, x, q, k, offset=0)
    for shift in (1, 7, 50):
        torch.testing.assert_close(logits(enc, x, q, k, offset=shift), base, atol=2e-4, rtol=1e-4)


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


def test_rodrigues_near_degenerate_plane_uses_series_without_nan_gradients():
    a = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([1.0, 1e-9, 0.0], dtype=torch.float64, requires_grad=True)   # s ≈ 1e-9
    x = torch.tensor([0.2, -0.5, 0.7], dtype=torch.float64)
    y = rodrigues_apply(a, b, x, 3.0)
    L = (a[:, None] * b[None, :] - b[:, None] * a[None, :]).detach()
    torch.testing.assert_close(y.detach(), torch.linalg.matrix_exp(3.0 * L) @ x, atol=1e-12, rtol=0)
    y.sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


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
