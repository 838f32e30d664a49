"""The rest of the GRAPE family (learned planes, shared basis, 2D/3D grids, contextual phases,
additive dictionary), each checked against an independent computation: explicit loops,
hand-built rotation matrices, torch.linalg.matrix_exp / inv, finite differences."""
import math

import pytest
import torch
import torch.nn.functional as F

from modeling.attention import attend, dense_attention, dense_logits
from grape import (GrapeADictionary, GrapeAGrid, GrapeAPhase, GrapeMContextualDictionary, GrapeMGrid, GrapeMLearnedBasis, GrapeMPlanes, alibi_slopes, build_encoding, raster_coordinates, rodrigues_apply, rope_frequencies)
from modeling.cache import LayerCache
from model import GPT, GPTConfig
from perturbation import perturb_parameters

B, H, T, D, C = 2, 2, 12, 8, 16
NEW = {"grape_m_planes": {}, "grape_m_grid": {"grid": (3, 4)}, "grape_m_ctx_dict": {},
       "grape_a_grid": {"grid": (3, 4)}, "grape_a_phase": {}, "grape_a_dict": {}}


def config(name, head_dim=D, n_head=H, **kw):
    return GPTConfig(n_layer=1, n_head=n_head, n_embd=n_head * head_dim, head_dim=head_dim, vocab_size=64,
                     block_size=kw.pop("block_size", 12), pos_encoding=name, **kw)


def inputs(seed=0, n_tokens=T, head_dim=D, n_head=H, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shape = (B, n_head, n_tokens, head_dim)
    return (torch.randn(B, n_tokens, n_head * head_dim, generator=g, dtype=dtype),
            torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype))


def perturb(enc, std=0.5, seed=1):
    torch.manual_seed(seed)
    perturb_parameters(enc, std)
    return enc


def J(d):
    """The canonical complex structure: blockdiag([[0, -1], [1, 0]])."""
    M = torch.zeros(d, d, dtype=torch.float64)
    for i in range(d // 2):
        M[2 * i + 1, 2 * i], M[2 * i, 2 * i + 1] = 1.0, -1.0
    return M


def generator(a, b):
    return a[:, None] * b[None, :] - b[:, None] * a[None, :]


def map_of(enc, head, **kw):
    """G of one head at the given position/coords, read off by transforming the basis vectors."""
    eye = torch.eye(D).view(D, 1, 1, D).expand(D, H, 1, D).contiguous()
    out, _, _ = enc(torch.zeros(D, 1, C), eye, eye, **kw)
    return out[:, head, 0, :].T.double()


def rotation_2x2_blocks(angles):
    """blockdiag of [[cos, -sin], [sin, cos]], entry by entry."""
    G = torch.zeros(2 * len(angles), 2 * len(angles), dtype=torch.float64)
    for i, a in enumerate(angles):
        c, s = math.cos(a), math.sin(a)
        G[2 * i, 2 * i], G[2 * i, 2 * i + 1], G[2 * i + 1, 2 * i], G[2 * i + 1, 2 * i + 1] = c, -s, s, c
    return G


causal = torch.tril(torch.ones(T, T, dtype=torch.bool))


# ---- learned planes (§2.3-2.4, Prop. 3.1) --------------------------------------------------

def random_planes(depth=1, head_dim=D):
    return perturb(GrapeMPlanes(config("grape_m_planes", head_dim=head_dim, grape_planes_depth=depth)))


@pytest.mark.parametrize("head_dim,depth", [(8, 1), (12, 2), (16, 1)])
def test_planes_are_orthonormal_with_b_equal_to_J_a(head_dim, depth):
    """Mutual orthogonality by construction, for any parameter values (12: a non-power-of-two frame)."""
    enc = random_planes(depth, head_dim)
    a, b = (t.detach().double() for t in enc.planes())
    for h in range(H):
        frame = torch.cat([a[h], b[h]])                                   # all d vectors
        torch.testing.assert_close(frame @ frame.T, torch.eye(head_dim, dtype=torch.float64), atol=1e-6, rtol=0)
        torch.testing.assert_close(b[h], a[h] @ J(head_dim).T, atol=1e-7, rtol=0)      # b_k = J a_k
    assert (a - torch.eye(head_dim, dtype=torch.float64)[0::2]).abs().max() > 0.1    # really learned planes


@pytest.mark.parametrize("n", [1, 7, 300])
def test_planes_map_is_the_product_of_the_planes_matrix_exponentials(n):
    """G(n) = Π_k matrix_exp(-n θ_k L(a_k, J a_k)) with L built by hand from the planes."""
    enc = random_planes()
    a, b = (t.detach().double() for t in enc.planes())
    theta = enc.frequencies().detach().double()
    for h in range(H):
        G = torch.eye(D, dtype=torch.float64)
        for i in range(D // 2):
            G = G @ torch.linalg.matrix_exp(-n * theta[h, i] * generator(a[h, i], b[h, i]))
        torch.testing.assert_close(map_of(enc, h, offset=n), G, atol=2e-5, rtol=0)


def test_planes_map_is_an_orthogonal_one_parameter_group_with_the_relative_law():
    enc = random_planes(depth=2)
    eye = torch.eye(D, dtype=torch.float64)
    for n, m in ((3, 5), (40, 200)):
        Gn, Gm, Gnm = (map_of(enc, 1, offset=s) for s in (n, m, n + m))
        torch.testing.assert_close(Gn.T @ Gn, eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(Gnm, Gn @ Gm, atol=1e-4, rtol=0)
    x, q, k = inputs()
    q2, k2, _ = enc(x, q, k, offset=11)
    torch.testing.assert_close(q2.norm(dim=-1), q.norm(dim=-1), atol=1e-5, rtol=1e-5)
    base = dense_logits(*enc(x, q, k)[:2])
    for shift in (1, 37, 500):
        torch.testing.assert_close(dense_logits(*enc(x, q, k, offset=shift)[:2]), base, atol=2e-4, rtol=1e-4)


def test_planes_start_as_rope_logits_to_float_rounding():
    torch.manual_seed(3)
    cfg = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=64, block_size=300)
    rope = GPT(GPTConfig(pos_encoding="rope", **cfg))
    planes = GPT(GPTConfig(pos_encoding="grape_m_planes", **cfg))
    missing, unexpected = planes.load_state_dict(rope.state_dict(), strict=False)
    learned = ("log_freq", "frame_re", "frame_im", "plane_axis", "butterfly")
    assert unexpected == [] and all(m.split(".")[-1] in learned for m in missing)
    idx = torch.randint(0, 64, (2, 300))
    with torch.no_grad():
        torch.testing.assert_close(planes(idx)[0], rope(idx)[0], atol=2e-5, rtol=1e-5)


def test_corollary_2_1_b_equal_J_a_rotates_by_omega_times_norm_squared():
    """b = J a: γ = 0, β = α, s = α, and exp(nωL(a, Ja)) is the rotation by -nω‖a‖² in the
    plane span{a, Ja} (identity off it) built by hand, i.e. ω_eff = ω‖a‖²."""
    g = torch.Generator().manual_seed(4)
    d = 10
    a = torch.randn(d, generator=g, dtype=torch.float64) * 1.7
    b = J(d) @ a
    alpha = (a @ a).item()
    assert abs(a @ b) < 1e-12 and abs(b @ b - alpha) < 1e-12
    L = generator(a, b)
    torch.testing.assert_close(torch.linalg.eigvals(L).imag.abs().max().item(), alpha)      # s = α
    e1, e2 = a / a.norm(), b / b.norm()
    x = torch.randn(d, generator=g, dtype=torch.float64)
    for n, omega in ((1, 0.3), (5, 0.07), (-3, 1.1)):
        phi = -n * omega * alpha
        x1, x2 = e1 @ x, e2 @ x
        by_hand = x - x1 * e1 - x2 * e2 + (x1 * math.cos(phi) - x2 * math.sin(phi)) * e1 \
            + (x1 * math.sin(phi) + x2 * math.cos(phi)) * e2
        torch.testing.assert_close(rodrigues_apply(a, b, x, n * omega), by_hand, atol=1e-12, rtol=0)
        unit = a / a.norm()
        torch.testing.assert_close(torch.linalg.matrix_exp(n * omega * L),
                                   torch.linalg.matrix_exp(n * omega * alpha * generator(unit, J(d) @ unit)),
                                   atol=1e-12, rtol=0)


# ---- grape_m_basis shared as in Algorithm 1 ----------------------------------------------

def test_shared_basis_is_one_orthogonal_E_for_all_heads_with_per_head_spectra():
    torch.manual_seed(5)
    enc = GrapeMLearnedBasis(config("grape_m_basis", grape_basis_shared=True, grape_m_per_head=True))
    assert enc.basis_raw.shape == (1, D, D)
    with torch.no_grad():
        enc.basis_raw.normal_(0, 0.3)
        enc.scaled_log_freq.normal_(0, 8.0)
    S = torch.triu(enc.basis_raw.detach().double()[0], 1)
    E = torch.linalg.matrix_exp(S - S.T)
    theta = enc.frequencies().detach().double()
    assert (theta[0] - theta[1]).abs().max() > 1e-3
    n = 9
    for h in range(H):
        R = rotation_2x2_blocks((n * theta[h]).tolist())
        torch.testing.assert_close(map_of(enc, h, offset=n), E @ R @ E.T, atol=1e-5, rtol=0)


# ---- 2D / 3D grids (Appendix G) ------------------------------------------------------------

def test_raster_coordinates_by_hand():
    pos = torch.arange(24)
    got = raster_coordinates(pos, (4, 6))
    assert got[13].tolist() == [2, 1] and got[23].tolist() == [3, 5]
    got = raster_coordinates(pos, (2, 3, 4))
    assert got[17].tolist() == [1, 1, 1] and got[11].tolist() == [0, 2, 3]
    assert raster_coordinates(torch.tensor([30]), (2, 3, 4)).tolist() == [[2, 1, 2]]   # leading axis grows


def axial_rope(y, coords, base=10000.0):
    """Independently written axial RoPE: the head is cut into len(axes) equal contiguous parts;
    part a rotates its pairs (2i, 2i+1) by coord_a · base^(-2i / part_width)."""
    n_axes = coords.shape[-1]
    width = y.shape[-1] // n_axes
    out = y.clone()
    for a in range(n_axes):
        for i in range(width // 2):
            angle = coords[:, a].double() * base ** (-2 * i / width)
            c, s = torch.cos(angle).float(), torch.sin(angle).float()
            lo, hi = a * width + 2 * i, a * width + 2 * i + 1
            out[..., lo] = y[..., lo] * c - y[..., hi] * s
            out[..., hi] = y[..., lo] * s + y[..., hi] * c
    return out


@pytest.mark.parametrize("grid,head_dim", [((3, 4), 8), ((2, 2, 3), 12)])
def test_grid_multiplicative_starts_as_axial_rope(grid, head_dim):
    enc = GrapeMGrid(config("grape_m_grid", head_dim=head_dim, grid=grid))
    x, q, k = inputs(head_dim=head_dim)
    offset = 0 if len(grid) == 3 else 3        # 3D: 12 tokens fill the grid
    coords = raster_coordinates(torch.arange(offset, offset + T), grid)
    q2, k2, _ = enc(x, q, k, offset=offset)
    torch.testing.assert_close(q2, axial_rope(q, coords), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k2, axial_rope(k, coords), atol=1e-5, rtol=1e-5)


def random_grid_coords(n_axes, seed=6, n_tokens=T):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 5, (n_tokens, n_axes), generator=g)


@pytest.mark.parametrize("name,extra", [("grape_m_grid", {}), ("grape_a_grid", {}),
                                        ("grape_a_grid", {"grid_distance": "signed"}),
                                        ("grape_a_grid", {"grid_distance": "radial"}),
                                        ("grape_m_grid+grape_a_grid", {})])
@pytest.mark.parametrize("grid", [(3, 4), (2, 2, 3)])
def test_grid_logits_depend_only_on_the_offset_vector(name, extra, grid):
    """(1) the same q and k at every token: logits are a function of c(j) - c(t) alone;
    (2) random q, k: translating every coordinate by one vector changes no logit."""
    enc = perturb(build_encoding(config(name, grid=grid, **extra)))
    coords = random_grid_coords(len(grid))
    x, q, k = inputs()
    same_q, same_k = q[:, :, :1].expand_as(q), k[:, :, :1].expand_as(k)
    logits = dense_logits(*enc(x, same_q, same_k, coords=coords))
    seen = {}
    for t in range(T):
        for j in range(t + 1):
            key = tuple((coords[j] - coords[t]).tolist())
            if key in seen:
                torch.testing.assert_close(logits[..., t, j], seen[key], atol=1e-4, rtol=1e-5)
            seen[key] = logits[..., t, j]
    assert len(seen) < T * (T + 1) // 2                   # some offsets did repeat
    base = dense_logits(*enc(x, q, k, coords=coords))
    for shift in ([1, 0, 0], [0, 3, 2], [7, -2, 5]):
        moved = coords + torch.tensor(shift[:len(grid)])
        torch.testing.assert_close(dense_logits(*enc(x, q, k, coords=moved)), base, atol=2e-4, rtol=1e-4)


def test_grid_raster_order_shifts_by_whole_rows_and_explicit_coords_agree():
    enc = perturb(build_encoding(config("grape_m_grid+grape_a_grid", grid=(6, 4), block_size=24)))
    x, q, k = inputs()
    base = dense_logits(*enc(x, q, k, offset=0))
    torch.testing.assert_close(dense_logits(*enc(x, q, k, offset=4)), base, atol=2e-4, rtol=1e-4)   # one row down
    assert not torch.allclose(dense_logits(*enc(x, q, k, offset=1)), base, atol=1e-3)  # not a translation
    explicit = dense_logits(*enc(x, q, k, coords=raster_coordinates(torch.arange(T), (6, 4))))
    torch.testing.assert_close(explicit, base, atol=1e-6, rtol=0)


def test_grid_multiplicative_map_preserves_norms_and_composes_per_axis():
    enc = perturb(GrapeMGrid(config("grape_m_grid", grid=(3, 4))))
    eye = torch.eye(D, dtype=torch.float64)

    def G(u, v):
        return map_of(enc, 0, coords=torch.tensor([[u, v]]))
    torch.testing.assert_close(G(2, 3).T @ G(2, 3), eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(G(2, 3), G(2, 0) @ G(0, 3), atol=1e-5, rtol=0)     # commuting axes
    torch.testing.assert_close(G(5, 1), G(2, 3) @ G(3, -2), atol=1e-4, rtol=0)
    x, q, k = inputs()
    q2, _, _ = enc(x, q, k, coords=random_grid_coords(2))
    torch.testing.assert_close(q2.norm(dim=-1), q.norm(dim=-1), atol=1e-5, rtol=1e-5)


def grid_bias_by_hand(slopes, coords, distance):
    n = coords.shape[0]
    out = torch.zeros(slopes.shape[0], n, n, dtype=torch.float64)
    for h in range(slopes.shape[0]):
        for t in range(n):
            for j in range(n):
                d = [float(coords[t, a] - coords[j, a]) for a in range(coords.shape[1])]
                s = slopes[h].tolist()
                if distance == "abs":
                    out[h, t, j] = -sum(si * abs(di) for si, di in zip(s, d))
                elif distance == "signed":
                    out[h, t, j] = -sum(si * di for si, di in zip(s, d))
                else:
                    out[h, t, j] = -math.sqrt(sum((si * di) ** 2 for si, di in zip(s, d)))
    return out


@pytest.mark.parametrize("distance", ["abs", "signed", "radial"])
def test_grid_additive_bias_matches_its_definition(distance):
    enc = perturb(GrapeAGrid(config("grape_a_grid", grid=(2, 2, 3), grid_distance=distance)))
    x, q, k = inputs()
    coords = raster_coordinates(torch.arange(T), (2, 2, 3))
    _, _, bias = enc(x, q, k)
    ref = grid_bias_by_hand(enc.axis_slopes().detach().double(), coords, distance)
    torch.testing.assert_close(bias.dense()[0].double()[:, causal], ref[:, causal], atol=1e-5, rtol=1e-5)


def test_grid_additive_starts_as_2d_alibi_with_manhattan_distance():
    enc = GrapeAGrid(config("grape_a_grid", grid=(3, 4)))
    x, q, k = inputs()
    _, _, bias = enc(x, q, k)
    m = alibi_slopes(H).double()
    for t in range(T):
        for j in range(t + 1):
            dist = abs(t // 4 - j // 4) + abs(t % 4 - j % 4)
            torch.testing.assert_close(bias.dense()[0, :, t, j].double(), -m * dist, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("distance", ["abs", "radial"])
def test_grid_distance_score_mod_adds_the_same_bias(distance):
    """FlexAttention's score_mod, called eagerly on broadcast index tensors, against dense()."""
    enc = perturb(GrapeAGrid(config("grape_a_grid", grid=(3, 4), grid_distance=distance)))
    x, q, k = inputs()
    _, _, bias = enc(x, q, k, coords=random_grid_coords(2))
    mod = bias.score_mod(B, H)
    b, h = torch.arange(B).view(B, 1, 1, 1), torch.arange(H).view(1, H, 1, 1)
    qi, ki = torch.arange(T).view(1, 1, T, 1), torch.arange(T).view(1, 1, 1, T)
    score = torch.randn(B, H, T, T)
    torch.testing.assert_close(mod(score, b, h, qi, ki), score + bias.dense(), atol=1e-5, rtol=1e-5)


def test_grid_settings_are_checked():
    with pytest.raises(ValueError, match="grid=\\(H, W\\)"):
        config("grape_m_grid")
    with pytest.raises(ValueError, match="used only by the grid encodings"):
        config("rope", grid=(3, 4))
    with pytest.raises(ValueError, match="fewer than block_size"):
        config("grape_a_grid", grid=(2, 3))
    with pytest.raises(ValueError, match="grid_distance"):
        config("grape_a_grid", grid=(3, 4), grid_distance="euclid")
    cfg = config("grape_a_grid", grid=[3, 4])
    assert cfg.grid == (3, 4) and GPTConfig.from_dict(cfg.to_dict()).grid == (3, 4)
    model = GPT(config("rope", grid=None))
    with pytest.raises(ValueError, match="no grid"):
        model(torch.zeros(1, 4, dtype=torch.long), coords=torch.zeros(4, 2))
    enc = GrapeMGrid(config("grape_m_grid", grid=(3, 4)))
    with pytest.raises(ValueError, match="coords must be"):
        enc(*inputs(), coords=torch.zeros(T, 3))


def test_grid_model_with_explicit_coords_decodes_from_the_cache_like_the_full_forward():
    torch.manual_seed(7)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=64, block_size=12, grid=(3, 4),
                          pos_encoding="grape_m_grid+grape_a_grid")).eval()
    perturb(model, std=0.3)
    idx = torch.randint(0, 64, (2, T))
    coords = random_grid_coords(2, seed=8)
    with torch.no_grad():
        full, _ = model(idx, coords=coords)
        caches, out = model.new_caches(), []
        for s, e in ((0, 5), (5, 6), (6, 11)):
            out.append(model(idx[:, s:e], caches=caches, coords=coords[s:e])[0])
        raster, _ = model(idx)
    torch.testing.assert_close(torch.cat(out, 1), full[:, :11], atol=2e-5, rtol=1e-5)
    assert not torch.allclose(raster, full, atol=1e-3)          # the coords were used
    with pytest.raises(ValueError, match="explicit coords"):
        model(idx[:, 11:], caches=caches)


# ---- contextual phases (§5, App. A) --------------------------------------------------------

def clock(z):
    return 2 / (1 + torch.exp(-z))


def phases_by_loop(x, w, b, link):
    """Φ[bi][r][t] = Σ_{ℓ<t} link(w_r·x_ℓ + b_r)."""
    out = []
    for bi in range(x.shape[0]):
        per_r = []
        for r in range(w.shape[0]):
            omega = [link(x[bi, l].double() @ w[r].double() + b[r].double()).item() for l in range(x.shape[1])]
            per_r.append([sum(omega[:t]) for t in range(x.shape[1])])
        out.append(per_r)
    return out


def test_phase_modulated_additive_bias_is_minus_rate_times_phase_difference():
    enc = perturb(GrapeAPhase(config("grape_a_phase")))
    x, q, k = inputs()
    _, _, bias = enc(x, q, k, offset=5)
    phi = phases_by_loop(x, enc.phase_proj.weight, enc.phase_proj.bias, clock)
    rate = (F.softplus(enc.rate_raw.double()) * alibi_slopes(H).double()).detach()
    got = bias.dense().double()
    for bi in range(B):
        for h in range(H):
            for t in range(T):
                for j in range(t + 1):
                    ref = -rate[h] * (phi[bi][0][t] - phi[bi][0][j])
                    assert abs(got[bi, h, t, j].item() - ref.item()) < 1e-4
    assert got[..., causal].std() > 0.1


def test_phase_modulated_additive_starts_as_alibi():
    for per_head in (False, True):
        enc = GrapeAPhase(config("grape_a_phase", grape_ctx_per_head=per_head))
        x, q, k = inputs()
        _, _, bias = enc(x, q, k)
        t = torch.arange(T)
        ref = -alibi_slopes(H).view(H, 1, 1) * (t[:, None] - t[None, :])
        torch.testing.assert_close(bias.dense()[..., causal], ref.expand(B, H, T, T)[..., causal], atol=1e-5, rtol=1e-6)


def test_contextual_dictionary_logits_follow_the_phase_differences():
    """q̃_t·k̃_j = q_tᵀ R(θ_i Σ_r C_{h,r,i}(Φ_{j,r} - Φ_{t,r})) k_j, Φ by a loop; and a common
    phase offset per channel changes nothing."""
    enc = perturb(GrapeMContextualDictionary(config("grape_m_ctx_dict", grape_ctx_dict_size=3)))
    x, q, k = inputs()
    got = dense_logits(*enc(x, q, k)[:2])
    phi = phases_by_loop(x, enc.phase_proj.weight, enc.phase_proj.bias, clock)
    C_mix, theta = enc.mix.detach().double(), rope_frequencies(D, 10000.0).double()
    for bi in range(B):
        for h in range(H):
            for t in (3, 11):
                for j in range(t + 1):
                    angles = [theta[i].item() * sum(C_mix[h, r, i].item() * (phi[bi][r][j] - phi[bi][r][t])
                                                    for r in range(3)) for i in range(D // 2)]
                    ref = q[bi, h, t].double() @ rotation_2x2_blocks(angles) @ k[bi, h, j].double() / math.sqrt(D)
                    assert abs(got[bi, h, t, j].item() - ref.item()) < 1e-4
    shifted = dense_logits(*enc(x, q, k, phase_offset=torch.tensor([3.5, -20.0, 7.25]))[:2])
    torch.testing.assert_close(shifted, got, atol=2e-4, rtol=1e-4)


def test_contextual_dictionary_starts_as_rope_in_frequency_bands():
    enc = GrapeMContextualDictionary(config("grape_m_ctx_dict", head_dim=16, grape_ctx_dict_size=3))
    assert enc.mix[0].argmax(0).tolist() == [0, 0, 0, 1, 1, 1, 2, 2]       # contiguous bands
    x, q, k = inputs(head_dim=16)
    rope = build_encoding(config("rope", head_dim=16))
    torch.testing.assert_close(enc(x, q, k)[0], rope(x, q, k)[0], atol=1e-5, rtol=1e-5)


# ---- commuting additive dictionary (App. J.3) ------------------------------------------------

def test_additive_dictionary_equals_the_lifted_unipotent_score():
    """Lift q̂ = [q; 1_R; 0_R], k̂ = [k; 0_R; 1_R], atoms A_r = -Λ_r e_(key slot r) e_(query slot r)ᵀ
    with Λ_r = ω_r (λ_q,r + λ_k,r): A_r A_s = 0 (dictionary closure), A² = 0, and
    q̂ᵀ inv(I + m A)ᵀ k̂ - qᵀk = m Σ_r Λ_r with m = j - t, the encoding's bias (Eq. 4.3, 4.5)."""
    R = 3
    enc = perturb(GrapeADictionary(config("grape_a_dict", grape_a_dict_size=R)))
    x, q, k = inputs()
    _, _, bias = enc(x, q, k, offset=2)
    got = bias.dense().double()
    w = enc.weights().detach().double()
    vq = F.normalize(enc.gate_q.detach().double(), dim=-1)
    vk = F.normalize(enc.gate_k.detach().double(), dim=-1)
    n = D + 2 * R
    for bi, h, t, j in ((0, 0, 7, 2), (1, 1, 11, 11), (1, 0, 9, 0)):
        qt, kj = q[bi, h, t].double(), k[bi, h, j].double()
        lam = [w[h, r] * (F.softplus(vq[h, r] @ qt / math.sqrt(D)) + F.softplus(vk[h, r] @ kj / math.sqrt(D)))
               for r in range(R)]
        atoms = []
        for r in range(R):
            E = torch.zeros(n, n, dtype=torch.float64)
            E[D + R + r, D + r] = 1.0
            atoms.append(-lam[r] * E)
        for Ar in atoms:
            for As in atoms:
                assert (Ar @ As).abs().max() == 0
        A = sum(atoms)
        assert (A @ A).abs().max() == 0
        q_hat = torch.cat([qt, torch.ones(R, dtype=torch.float64), torch.zeros(R, dtype=torch.float64)])
        k_hat = torch.cat([kj, torch.zeros(R, dtype=torch.float64), torch.ones(R, dtype=torch.float64)])
        m = j - t
        lifted = q_hat @ torch.linalg.inv(torch.eye(n, dtype=torch.float64) + m * A).T @ k_hat - qt @ kj
        assert abs(got[bi, h, t, j].item() - lifted.item()) < 1e-5


def test_additive_dictionary_obeys_the_relative_law():
    enc = perturb(GrapeADictionary(config("grape_a_dict")))
    x, q, k = inputs()
    base = enc(x, q, k)[2].dense()
    for shift in (1, 50):
        torch.testing.assert_close(enc(x, q, k, offset=shift)[2].dense(), base, atol=1e-5, rtol=1e-5)


# ---- every new encoding: gradients, long sequences on the fast paths --------------------------

def attention_loss(enc, x, q, k, v, weight, backend="dense"):
    q2, k2, bias = enc(x, q, k, v=v)
    return (attend(q2, k2, v, bias, backend) * weight).sum()


def float64_attention_loss(enc, x, q, k, v, weight):
    """Softmax attention written out in float64 (the backends compute in float32)."""
    q2, k2, bias = enc(x, q, k, v=v)
    logits = q2 @ k2.transpose(-1, -2) / math.sqrt(q2.shape[-1])
    if bias is not None:
        logits = logits + bias.dense()
    logits = logits.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool)), float("-inf"))
    return (torch.softmax(logits, -1) @ v * weight).sum()


@pytest.mark.parametrize("name", NEW)
def test_every_parameter_gradient_matches_finite_differences(name):
    """Autograd's directional derivative along a random direction, per parameter tensor, against
    a central finite difference of the same loss in float64; and every gradient is non-zero."""
    enc = perturb(build_encoding(config(name, **NEW[name]))).double()
    x, q, k = inputs(dtype=torch.float64)
    v = torch.randn_like(q)
    weight = torch.randn_like(q)
    loss = float64_attention_loss(enc, x, q, k, v, weight)
    assert loss.dtype == torch.float64
    params = dict(enc.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()))
    g = torch.Generator().manual_seed(9)
    for (pname, p), grad in zip(params.items(), grads):
        assert grad.abs().sum() > 0, pname
        direction = torch.randn(p.shape, generator=g, dtype=torch.float64)
        eps = 1e-6
        with torch.no_grad():
            p.add_(eps * direction)
            up = float64_attention_loss(enc, x, q, k, v, weight)
            p.sub_(2 * eps * direction)
            down = float64_attention_loss(enc, x, q, k, v, weight)
            p.add_(eps * direction)
        numeric = (up - down) / (2 * eps)
        analytic = (grad * direction).sum()
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (pname, numeric.item(), analytic.item())


LONG = [("grape_a_phase", {}), ("grape_a_dict", {}), ("grape_a_grid", {"grid": (10, 32), "grid_distance": "signed"}),
        ("grape_a_grid", {"grid": (10, 32)}), ("grape_a_grid", {"grid": (3, 10, 10), "grid_distance": "radial"})]


@pytest.mark.parametrize("name,extra", LONG, ids=[f"{n}-{e.get('grid_distance', 'abs')}" for n, e in LONG])
def test_fast_path_matches_dense_at_long_length(name, extra):
    """T = 300: the chunked CPU path (SeparableBias columns, or any Bias in query tiles) against
    the dense reference, values and gradients, also for a prefix + continuation through the cache."""
    torch.manual_seed(10)
    n = 300
    enc = perturb(build_encoding(config(name, **extra, block_size=n)), std=0.3)
    x, q, k = inputs(n_tokens=n)
    v = torch.randn_like(q)
    for t in (x, q, k, v):
        t.requires_grad_(True)
    weight = torch.randn_like(q)
    results = []
    for backend in ("dense", "chunked"):
        loss = attention_loss(enc, x, q, k, v, weight, backend)
        grads = torch.autograd.grad(loss, [x, q, k, v, *enc.parameters()], allow_unused=True)
        results.append((loss.detach(), grads))
    (l_ref, g_ref), (l_got, g_got) = results
    torch.testing.assert_close(l_got, l_ref, atol=1e-3, rtol=1e-4)
    for a, b in zip(g_got, g_ref):
        assert (a is None) == (b is None)
        if b is not None:
            torch.testing.assert_close(a, b, atol=1e-4 * b.abs().max().item() + 1e-6, rtol=1e-3)
    with torch.no_grad():                          # streaming: prefix of 200 then 100 through the cache
        cache = LayerCache()
        q0, k0, _ = enc(x[:, :200], q[:, :, :200], k[:, :, :200], cache=cache)
        cache.length = 200
        q1, k1, bias = enc(x[:, 200:], q[:, :, 200:], k[:, :, 200:], offset=200, cache=cache)
        tail = attend(q1, torch.cat([k0, k1], 2), v, bias, "chunked")
        q2, k2, full_bias = enc(x, q, k)
        full = dense_attention(q2, k2, v, full_bias)
    torch.testing.assert_close(tail, full[:, :, 200:], atol=2e-5, rtol=1e-4)


def test_grid_example_runs_at_toy_size():
    """scripts/grid_next_patch.py end to end at a toy size (the real run takes under two minutes)."""
    from scripts import grid_next_patch as example
    images = example.rectangles(3, 6, torch.Generator().manual_seed(0))
    assert images.shape == (3, 36) and images.max() < example.COLOURS and (images > 0).any()
    results = example.main(["--steps", "3", "--train_size", "4", "--eval_size", "6", "--batch_size", "2",
                            "--eval_images", "4", "--width", "16", "--encodings", "rope", "grape_m_grid+grape_a_grid"])
    assert [r["encoding"] for r in results] == ["rope", "grape_m_grid+grape_a_grid"]
    for r in results:
        assert 0 < r["train_size"] < 5 and 0 < r["eval_size"] < 5


@pytest.mark.parametrize("name", ["grape_m_planes", "grape_m_grid+grape_a_grid", "grape_m_ctx_dict+grape_a_phase",
                                  "grape_a_dict"])
def test_model_is_exactly_causal_on_the_fast_paths(name):
    """T = 300 (SDPA, chunked): changing tokens after t changes no logit at or before t, bit for bit."""
    torch.manual_seed(11)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=64, block_size=300,
                          grid=(10, 30) if "grid" in name else None, pos_encoding=name)).eval()
    perturb(model, std=0.3)
    idx = torch.randint(0, 64, (1, 300))
    changed = idx.clone()
    changed[:, 201:] = torch.randint(0, 64, (1, 99))
    with torch.no_grad():
        a, b = model(idx).logits, model(changed).logits
    assert torch.equal(a[:, :201], b[:, :201])
    assert not torch.allclose(a[:, 201:], b[:, 201:])
