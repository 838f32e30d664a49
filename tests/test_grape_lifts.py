"""Additive GRAPE as a group action (§4, §5, Appendices C, E, J.3), checked in the lifted space.

Every reference here builds the (d+k)-dimensional homogeneous vectors and the unipotent
matrices of the paper by hand with torch (nilpotent generators, torch.linalg.matrix_exp,
torch.linalg.inv for the paired inverse-transpose, explicit ordered matrix products) and
scores q̃ᵀk̃ in that space. The encodings under test are only asked for what the model sees:
the logits q̃·k̃/√d + b(t, j) from their outputs, with b from ``bias.dense()``. The lifted
score carries the 1/√d of the bilinear part by lifting q/√d.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from modeling.attention import attend
from grape import build_encoding
from model import GPTConfig
from perturbation import perturb_parameters

B, H, T, D, C = 2, 4, 12, 8, 32
CAUSAL = torch.tril(torch.ones(T, T, dtype=torch.bool))
# ALiBi's slopes for H = 4 heads, written out: 2^(-8/H · (h+1))
ALIBI_SLOPES = torch.tensor([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8], dtype=torch.float64)


def config(pos_encoding, **kw):
    return GPTConfig(n_layer=1, n_head=H, n_embd=C, head_dim=D, vocab_size=64, block_size=1024,
                     pos_encoding=pos_encoding, **kw)


def perturbed(name, seed=0, **kw):
    """The encoding with every parameter moved off its initial value (gates depend on content)."""
    torch.manual_seed(seed)
    enc = build_encoding(config(name, **kw))
    perturb_parameters(enc, 0.5)
    return enc


def inputs(T=T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, C, generator=g), torch.randn(B, H, T, D, generator=g),
            torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g))


def model_logits(enc, x, q, k, offset=0):
    """What attention adds up, from the encoding's outputs: q̃·k̃/√d + b(t, j) (float64)."""
    q2, k2, bias = enc(x, q, k, offset=offset)
    out = q2.double() @ k2.double().transpose(-1, -2) / math.sqrt(D)
    return out if bias is None else out + bias.dense().double()


# ---- the lifted space ---------------------------------------------------------------------

N = D + 2                                   # gl(d+2): q̂ = [q; 1; 0], k̂ = [k; 0; 1]
E = torch.zeros(N, N, dtype=torch.float64)
E[D + 1, D] = 1.0                           # e_{d+2} e_{d+1}ᵀ (Eq. 4.4), rank 1, E² = 0


def lift_query(q):
    one, zero = torch.ones_like(q[..., :1]), torch.zeros_like(q[..., :1])
    return torch.cat([q.double() / math.sqrt(D), one, zero], -1).double()


def lift_key(k):
    one, zero = torch.ones_like(k[..., :1]), torch.zeros_like(k[..., :1])
    return torch.cat([k.double(), zero, one], -1).double()


def inverse_transpose(G):
    return torch.linalg.inv(G).transpose(-1, -2)


def paired_scores(q, k, G_query, G_key):
    """q̃_tᵀ k̃_j with q̃_t = G_query[t] q̂_t and k̃_j = G_key[j]^{-T} k̂_j (Eq. 4.2).

    ``G_query``/``G_key`` are (Tq, N, N) / (Tk, N, N), or (Tq, Tk, N, N) when the generator
    depends on the pair (t, j) as GRAPE-A's gated one does (Eq. 4.5)."""
    q_hat, k_hat = lift_query(q), lift_key(k)                        # (T, N)
    if G_query.dim() == 3:
        q_tilde = torch.einsum("tab,tb->ta", G_query, q_hat)
        k_tilde = torch.einsum("jab,jb->ja", inverse_transpose(G_key), k_hat)
        return q_tilde @ k_tilde.T
    q_tilde = torch.einsum("tjab,tb->tja", G_query, q_hat)
    k_tilde = torch.einsum("tjab,jb->tja", inverse_transpose(G_key), k_hat)
    return (q_tilde * k_tilde).sum(-1)


def assert_causal_close(got, want, atol=2e-5, rtol=1e-5, msg=""):
    torch.testing.assert_close(got[..., CAUSAL], want[..., CAUSAL], atol=atol, rtol=rtol, msg=lambda m: f"{msg}{m}")


# ---- ALiBi: a rank-1 unipotent in GL(d+2) (§4.2, Eq. 4.7) ----------------------------------

def test_alibi_equals_rank1_unipotent_lift_in_gl_d_plus_2():
    enc = build_encoding(config("alibi"))
    x, q, k, _ = inputs()
    offset = 5
    ours = model_logits(enc, x, q, k, offset)
    pos = torch.arange(offset, offset + T, dtype=torch.float64)
    for h in range(H):
        A = -ALIBI_SLOPES[h] * E                                     # A_h = -β_h e_{d+2} e_{d+1}ᵀ
        assert torch.equal(A @ A, torch.zeros(N, N, dtype=torch.float64))
        G = torch.linalg.matrix_exp(pos[:, None, None] * A)         # G(n) = exp(n A_h), absolute n
        eye = torch.eye(N, dtype=torch.float64)
        torch.testing.assert_close(G, eye + pos[:, None, None] * A)          # unipotent: I + nA
        torch.testing.assert_close(G[3] @ G[4], torch.linalg.matrix_exp((pos[3] + pos[4]) * A))
        assert torch.allclose(torch.linalg.eigvals(G[7]), torch.ones(N, dtype=torch.complex128))
        for b in range(B):
            lifted = paired_scores(q[b, h], k[b, h], G, G)
            # Eq. 4.3: the same score is q̂ᵀ G(j - i)^{-T} k̂, a function of j - i only
            rel = torch.linalg.matrix_exp((pos[None, :] - pos[:, None])[..., None, None] * A)
            relative = torch.einsum("ta,tjab,jb->tj", lift_query(q[b, h]), inverse_transpose(rel),
                                    lift_key(k[b, h]))
            torch.testing.assert_close(lifted, relative)
            # = qᵀk/√d + (j - i) β_h
            by_formula = (q[b, h].double() @ k[b, h].double().T / math.sqrt(D)
                          + (pos[None, :] - pos[:, None]) * ALIBI_SLOPES[h])
            torch.testing.assert_close(lifted, by_formula)
            assert_causal_close(ours[b, h], lifted, msg=f"head {h}: ")


# ---- GRAPE-A: gated unipotent in GL(d+2) (Eqs. 4.4-4.6) -------------------------------------

def grape_a_rates(enc, q, k, gates):
    """ω_h λ_q(q_t) and ω_h λ_k(k_j) from the module's parameters and Eq. 4.6's definitions:
    λ_q = softplus(v̂ᵀq/√d), λ_k = softplus(ûᵀk/√d) with unit v̂, û; ω_h = softplus(ω̂_h)·β_h."""
    omega = F.softplus(enc.omega_raw.detach().double()) * ALIBI_SLOPES             # (H,)

    def gate(vec, y):
        unit = vec.detach().double() / vec.detach().double().norm(dim=-1, keepdim=True)
        return F.softplus(torch.einsum("bhtd,hd->bht", y.double(), unit) / math.sqrt(D))
    zero = torch.zeros(B, H, q.shape[2], dtype=torch.float64)
    lam_q = gate(enc.gate_q, q) if "q" in gates else zero
    lam_k = gate(enc.gate_k, k) if "k" in gates else zero
    return omega, lam_q, lam_k


@pytest.mark.parametrize("gates", ["q", "k", "qk"])
def test_grape_a_equals_gated_unipotent_lift_in_gl_d_plus_2(gates):
    """q̂ = [q; 1; 0], k̂ = [k; 0; 1], A_ij = -Λ_ij A0 with Λ_ij = λ_q(q_i) + λ_k(k_j) (Eq. 4.5):
    q̃_iᵀk̃_j = (G(i) q̂_i)ᵀ (G(j)^{-T} k̂_j), G(n) = exp(n ω A_ij), equals qᵀk + (j - i) ω Λ_ij."""
    enc = perturbed("grape_a_" + gates)
    x, q, k, _ = inputs()
    offset = 7
    ours = model_logits(enc, x, q, k, offset)
    omega, lam_q, lam_k = grape_a_rates(enc, q, k, gates)
    pos = torch.arange(offset, offset + T, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            Lam = lam_q[b, h][:, None] + lam_k[b, h][None, :]                   # (T, T) ≥ 0
            A = -Lam[..., None, None] * E                                      # A_ij (T, T, N, N)
            G_query = torch.linalg.matrix_exp(pos[:, None, None, None] * omega[h] * A)   # G(i) for pair (i, j)
            G_key = torch.linalg.matrix_exp(pos[None, :, None, None] * omega[h] * A)     # G(j) for pair (i, j)
            lifted = paired_scores(q[b, h], k[b, h], G_query, G_key)
            by_formula = (q[b, h].double() @ k[b, h].double().T / math.sqrt(D)
                          + (pos[None, :] - pos[:, None]) * omega[h] * Lam)
            torch.testing.assert_close(lifted, by_formula)
            assert_causal_close(ours[b, h], lifted, msg=f"batch {b} head {h}: ")
    # the gates are content-dependent: the slope differs from pair to pair
    assert (lam_q + lam_k).std() > 0.05


@pytest.mark.parametrize("gates", ["q", "k", "qk"])
def test_grape_a_fast_path_at_long_length_uses_the_lifted_bias(gates):
    """T = 300 (the chunked path): attention output equals softmax(qkᵀ/√d + (j - i) ω Λ_ij) v,
    the closed form the lift above was checked to give."""
    n = 300
    enc = perturbed("grape_a_" + gates)
    x, q, k, v = inputs(T=n)
    offset = 4
    with torch.no_grad():
        q2, k2, bias = enc(x, q, k, v, offset=offset)
        got = attend(q2, k2, v, bias, "chunked")
    omega, lam_q, lam_k = grape_a_rates(enc, q, k, gates)
    t = torch.arange(n, dtype=torch.float64)
    rate = omega.view(1, H, 1, 1) * (lam_q[..., :, None] + lam_k[..., None, :])
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(D) + (t[None, :] - t[:, None]) * rate
    want = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1) @ v.double()
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)


def test_translation_lift_in_gl_d_plus_1_gives_a_key_linear_slope():
    """Eq. 4.1: A = [[0, u], [0ᵀ, 0]] ∈ gl(d+1) translates x̂ = [x; 1] by nωu; scored with the
    paired inverse-transpose (q̂ = [q; 1], k̂ = [k; 1]) it adds (i - j) ω uᵀk_j to qᵀk, plus the
    constant 1 the softmax ignores: a key-linear slope, the kind Remark 4.1 places in GL(d+1)."""
    g = torch.Generator().manual_seed(3)
    d = D
    u = torch.randn(d, generator=g, dtype=torch.float64)
    omega = 0.3
    A = torch.zeros(d + 1, d + 1, dtype=torch.float64)
    A[:d, d] = u
    assert torch.equal(A @ A, torch.zeros_like(A))
    x = torch.randn(d, generator=g, dtype=torch.float64)
    for n in (2.0, -5.0):
        G = torch.linalg.matrix_exp(n * omega * A)
        torch.testing.assert_close(G @ torch.cat([x, x.new_ones(1)]), torch.cat([x + n * omega * u, x.new_ones(1)]))
    q = torch.randn(T, d, generator=g, dtype=torch.float64)
    k = torch.randn(T, d, generator=g, dtype=torch.float64)
    pos = torch.arange(4, 4 + T, dtype=torch.float64)
    G = torch.linalg.matrix_exp(pos[:, None, None] * omega * A)
    q_hat, k_hat = torch.cat([q, q.new_ones(T, 1)], 1), torch.cat([k, k.new_ones(T, 1)], 1)
    q_tilde = torch.einsum("tab,tb->ta", G, q_hat)
    k_tilde = torch.einsum("jab,jb->ja", inverse_transpose(G), k_hat)
    want = q @ k.T + (pos[:, None] - pos[None, :]) * omega * (k @ u)[None, :] + 1
    torch.testing.assert_close(q_tilde @ k_tilde.T, want)


# ---- composition: one block-diagonal action in GL(d+2) (Appendix E) --------------------------

def rope_generator(d, base=10000.0):
    """L_RoPE = Σ_i θ_i (e_{2i} e_{2i+1}ᵀ - e_{2i+1} e_{2i}ᵀ)ᵀ, θ_i = base^(-2i/d): the generator
    whose exponential rotates each coordinate pair (x_{2i}, x_{2i+1}) by +nθ_i."""
    L = torch.zeros(d, d, dtype=torch.float64)
    for i in range(d // 2):
        theta = base ** (-2 * i / d)
        L[2 * i + 1, 2 * i], L[2 * i, 2 * i + 1] = theta, -theta
    return L


def test_rope_plus_grape_a_equals_the_joint_block_diagonal_lift():
    """G_joint(m) = exp(m L) ⊕ [[1, mωΛ], [0, 1]] in GL(d+2) (Appendix E): paired-inverse-transpose
    scores equal the composed encoding's logits q̃·k̃/√d + b, the bias from un-rotated q, k."""
    enc = perturbed("rope+grape_a_qk")
    x, q, k, _ = inputs()
    offset = 3
    ours = model_logits(enc, x, q, k, offset)
    omega, lam_q, lam_k = grape_a_rates(enc.bias, q, k, "qk")
    L = rope_generator(D)
    pos = torch.arange(offset, offset + T, dtype=torch.float64)
    for b, h in ((0, 0), (1, 3)):
        Lam = lam_q[b, h][:, None] + lam_k[b, h][None, :]
        joint = torch.zeros(T, T, N, N, dtype=torch.float64)        # generator of pair (i, j)
        joint[..., :D, :D] = L
        joint[..., D + 1, D] = -omega[h] * Lam                      # ωA_ij = -ωΛ_ij e_{d+2}e_{d+1}ᵀ
        G_query = torch.linalg.matrix_exp(pos[:, None, None, None] * joint)
        G_key = torch.linalg.matrix_exp(pos[None, :, None, None] * joint)
        # the top block is orthogonal, so its inverse-transpose is itself: keys rotate like queries
        top = G_key[0, 5, :D, :D]
        torch.testing.assert_close(inverse_transpose(top), top)
        lifted = paired_scores(q[b, h], k[b, h], G_query, G_key)
        assert_causal_close(ours[b, h], lifted, msg=f"batch {b} head {h}: ")


# ---- GRAPE-AP: the path product collapses (Eq. 5.4, Appendix J.3) -----------------------------

def planar_rotation_generator(d):
    """J = ⊕ [[0, -1], [1, 0]] on coordinate pairs: R_ℓ = exp(ℓ J) rotates each pair by ℓ."""
    J = torch.zeros(d, d, dtype=torch.float64)
    for i in range(d // 2):
        J[2 * i + 1, 2 * i], J[2 * i, 2 * i + 1] = 1.0, -1.0
    return J


def grape_ap_edges(enc, x, offset, dp):
    """ψ_h(t, ℓ) = m_h logsigmoid(⟨p_t, R_ℓ p̂_ℓ⟩ / d_p) (Eq. 5.1) from the module's projection:
    p = W_p x per head, p̂ = p / RMS(p), R_ℓ = exp(ℓ J) by matrix_exp. Returns (B, H, T, T)."""
    n = x.shape[1]
    W = enc.p_proj.weight.detach().double().view(H, dp, C)
    p = torch.einsum("hpc,btc->bhtp", W, x.double())
    p_hat = p / p.pow(2).mean(-1, keepdim=True).sqrt()
    pos = torch.arange(offset, offset + n, dtype=torch.float64)
    R = torch.linalg.matrix_exp(pos[:, None, None] * planar_rotation_generator(dp))     # (T, dp, dp)
    r = torch.einsum("lxy,bhly->bhlx", R, p_hat)
    return ALIBI_SLOPES.view(1, H, 1, 1) * F.logsigmoid(p @ r.transpose(-1, -2) / dp)


def test_grape_ap_path_product_collapses_to_one_unipotent_carrying_the_bias():
    """Π_{ℓ=j+1..t} (I - ψ(t, ℓ) E), multiplied out in order, equals I - b(t, j) E with E² = 0;
    the b it carries equals GRAPE-AP's bias, and scoring with its inverse-transpose gives
    q̂ᵀ(I - bE)^{-T}k̂ = qᵀk + b = the model's logit."""
    dp = 4
    enc = perturbed("grape_ap", p_head_dim=dp)
    x, q, k, _ = inputs()
    offset = 6
    ours = model_logits(enc, x, q, k, offset)
    psi = grape_ap_edges(enc, x, offset, dp)
    assert (psi < 0).all()
    eye = torch.eye(N, dtype=torch.float64)
    assert torch.equal(E @ E, torch.zeros(N, N, dtype=torch.float64))
    for b in range(B):
        for h in (0, 2):
            for t in range(T):
                for j in range(t + 1):
                    path = eye.clone()
                    for l in range(j + 1, t + 1):
                        path = path @ (eye - psi[b, h, t, l] * E)
                    carried = -path[D + 1, D]
                    torch.testing.assert_close(path, eye - carried * E, rtol=0, atol=1e-12)
                    want = q[b, h, t].double() @ k[b, h, j].double() / math.sqrt(D) + carried
                    score = lift_query(q[b, h, t]) @ inverse_transpose(path) @ lift_key(k[b, h, j])
                    torch.testing.assert_close(score, want, rtol=0, atol=1e-12)
                    assert abs(ours[b, h, t, j].item() - score.item()) < 2e-5 * (1 + abs(score.item())), (b, h, t, j)


def test_grape_ap_fast_path_at_long_length_uses_the_path_integral_bias():
    """T = 300 (the chunked path): attention output equals softmax(qkᵀ/√d + b) v with b the
    row sums of the independently built edges ψ (the collapsed path products above)."""
    dp, n = 4, 300
    enc = perturbed("grape_ap", p_head_dim=dp)
    x, q, k, v = inputs(T=n)
    offset = 11
    with torch.no_grad():
        q2, k2, bias = enc(x, q, k, v, offset=offset)
        got = attend(q2, k2, v, bias, "chunked")
    psi = grape_ap_edges(enc, x, offset, dp)
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    psi = psi.masked_fill(~causal, 0.0)
    b_path = psi.flip(-1).cumsum(-1).flip(-1) - psi                   # Σ_{ℓ=j+1..t} ψ(t, ℓ)
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(D) + b_path
    want = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1) @ v.double()
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)


# ---- FoX with a constant forget gate is ALiBi (Appendix C) -----------------------------------

def constant_gate_fox(slopes):
    """FoX with every weight zero and the bias chosen so that log f_h = log sigmoid(b_h) = -m_h."""
    enc = build_encoding(config("fox"))
    with torch.no_grad():
        for p in enc.parameters():
            if p.dim() >= 2:
                p.zero_()
            else:
                p.copy_(-torch.log(torch.expm1(slopes)))
    return enc


@pytest.mark.parametrize("n", [T, 300])
def test_fox_with_a_constant_forget_gate_is_alibi(n):
    """f_ℓ,h ≡ e^{-m_h} makes D_ij = Σ_{ℓ=j+1..i} log f = -m_h (i - j): FoX's bias is ALiBi's with
    slopes m_h (checked against the hand formula, against grape's ALiBi, and at T = 300 through
    the chunked attention path against a softmax built by hand)."""
    fox = constant_gate_fox(ALIBI_SLOPES.float())
    alibi = build_encoding(config("alibi"))
    x, q, k, v = inputs(T=n)
    offset = 9
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    t = torch.arange(n, dtype=torch.float64)
    hand = -ALIBI_SLOPES.view(H, 1, 1) * (t[:, None] - t[None, :])
    with torch.no_grad():
        outs = {}
        for name, enc in (("fox", fox), ("alibi", alibi)):
            q2, k2, bias = enc(x, q, k, v, offset=offset)
            dense = bias.dense().double().expand(B, H, n, n)
            torch.testing.assert_close(dense[..., causal], hand.expand(B, H, n, n)[..., causal],
                                       atol=1e-4, rtol=1e-5, msg=lambda m: f"{name}: {m}")
            outs[name] = attend(q2, k2, v, bias, "chunked")
    logits = (q.double() @ k.double().transpose(-1, -2) / math.sqrt(D) + hand).masked_fill(~causal, float("-inf"))
    want = torch.softmax(logits, -1) @ v.double()
    for name, got in outs.items():
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
