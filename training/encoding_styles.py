"""One look per encoding in every figure: a colour no other encoding of the study shares, a line
style by group (solid: the paper's encodings and NoPE; dashed: the rest of the GRAPE family;
dotted: anything else, e.g. compositions) and a marker, so 16+ lines stay tellable apart."""
from __future__ import annotations

PAPER = {   # the paper's tables, and NoPE
    "nope": "#000000", "rope": "#1f77b4", "alibi": "#ff7f0e", "fox": "#2ca02c", "grape_m": "#d62728",
    "grape_m_ctx": "#9467bd", "grape_a_q": "#8c564b", "grape_a_k": "#e377c2", "grape_a_qk": "#bcbd22",
    "grape_ap": "#17becf",
}
FAMILY = {  # beyond the original code (SPEC §6)
    "grape_m_basis": "#7f7f7f", "grape_m_nc": "#000080", "grape_m_planes": "#ff1493",
    "grape_m_ctx_dict": "#8b4513", "grape_a_phase": "#32cd32", "grape_a_dict": "#daa520",
}
SPARE = ["#4b0082", "#00ced1", "#b22222", "#556b2f", "#ff6347", "#4682b4", "#9acd32", "#c71585"]
MARKERS = "osD^vP*Xph<>d"


def styles(encodings: list[str]) -> dict[str, dict]:
    """matplotlib keyword arguments (color, linestyle, marker) per encoding, stable across runs."""
    out, spare = {}, iter(SPARE * 4)
    for i, enc in enumerate(encodings):
        if enc in PAPER:
            color, ls = PAPER[enc], "-"
        elif enc in FAMILY:
            color, ls = FAMILY[enc], "--"
        else:
            color, ls = next(spare), ":"
        order = list(PAPER) + list(FAMILY)
        marker = MARKERS[(order.index(enc) if enc in order else i) % len(MARKERS)]
        out[enc] = {"color": color, "linestyle": ls, "marker": marker}
    return out
