"""The survey's Table 1, in one place.

Source: Tay, Dehghani, Bahri, Metzler, "Efficient Transformers: A Survey", arXiv:2009.06732
(2020), Table 1 ("Summary of Efficient Transformer Models"): complexity, whether the model can
decode autoregressively, and the taxonomy class. Class letters: FP fixed patterns, LP learnable
patterns, M memory / global tokens, LR low rank, KR kernels, RC recurrence.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SurveyRow:
    title: str
    paper: str
    year: int
    taxonomy: tuple[str, ...]
    complexity: str
    decode: bool


CLASS_NAMES = {
    "FP": "fixed patterns",
    "LP": "learnable patterns",
    "M": "memory / global tokens",
    "LR": "low rank",
    "KR": "kernels",
    "RC": "recurrence",
}

SURVEY_TABLE: dict[str, SurveyRow] = {
    "transformer": SurveyRow(
        "Transformer", "Vaswani et al., Attention Is All You Need (arXiv:1706.03762)",
        2017, (), "O(N²)", True),
    "memory_compressed": SurveyRow(
        "Memory Compressed", "Liu et al., Generating Wikipedia by Summarizing Long Sequences "
        "(arXiv:1801.10198)", 2018, ("FP", "M"), "O(N_c²)", True),
    "image_transformer": SurveyRow(
        "Image Transformer", "Parmar et al., Image Transformer (arXiv:1802.05751)",
        2018, ("FP",), "O(N·m)", True),
    "set_transformer": SurveyRow(
        "Set Transformer", "Lee et al., Set Transformer (arXiv:1810.00825)",
        2019, ("M",), "O(kN)", False),
    "transformer_xl": SurveyRow(
        "Transformer-XL", "Dai et al., Transformer-XL (arXiv:1901.02860)",
        2019, ("RC",), "O(N²)", True),
    "sparse_transformer": SurveyRow(
        "Sparse Transformer", "Child et al., Generating Long Sequences with Sparse Transformers "
        "(arXiv:1904.10509)", 2019, ("FP",), "O(N√N)", True),
    "reformer": SurveyRow(
        "Reformer", "Kitaev et al., Reformer: The Efficient Transformer (arXiv:2001.04451)",
        2020, ("LP",), "O(N log N)", True),
    "routing_transformer": SurveyRow(
        "Routing Transformer", "Roy et al., Efficient Content-Based Sparse Attention with "
        "Routing Transformers (arXiv:2003.05997)", 2020, ("LP",), "O(N√N)", True),
    "axial_transformer": SurveyRow(
        "Axial Transformer", "Ho et al., Axial Attention in Multidimensional Transformers "
        "(arXiv:1912.12180)", 2019, ("FP",), "O(N√N)", True),
    "compressive_transformer": SurveyRow(
        "Compressive Transformer", "Rae et al., Compressive Transformers for Long-Range "
        "Sequence Modelling (arXiv:1911.05507)", 2020, ("RC",), "O(N²)", True),
    "sinkhorn_transformer": SurveyRow(
        "Sinkhorn Transformer", "Tay et al., Sparse Sinkhorn Attention (arXiv:2002.11296)",
        2020, ("LP",), "O(B²)", True),
    "longformer": SurveyRow(
        "Longformer", "Beltagy et al., Longformer: The Long-Document Transformer "
        "(arXiv:2004.05150)", 2020, ("FP", "M"), "O(N(k+m))", True),
    "etc": SurveyRow(
        "ETC", "Ainslie et al., ETC: Encoding Long and Structured Inputs in Transformers "
        "(arXiv:2004.08483)", 2020, ("FP", "M"), "O(N_g² + N·N_g)", False),
    "synthesizer": SurveyRow(
        "Synthesizer", "Tay et al., Synthesizer: Rethinking Self-Attention in Transformer "
        "Models (arXiv:2005.00743)", 2020, ("LR", "LP"), "O(N²)", True),
    "performer": SurveyRow(
        "Performer", "Choromanski et al., Rethinking Attention with Performers "
        "(arXiv:2009.14794)", 2020, ("KR",), "O(N)", True),
    "linformer": SurveyRow(
        "Linformer", "Wang et al., Linformer: Self-Attention with Linear Complexity "
        "(arXiv:2006.04768)", 2020, ("LR",), "O(N)", False),
    "linear_transformer": SurveyRow(
        "Linear Transformers", "Katharopoulos et al., Transformers are RNNs "
        "(arXiv:2006.16236)", 2020, ("KR",), "O(N)", True),
    "bigbird": SurveyRow(
        "Big Bird", "Zaheer et al., Big Bird: Transformers for Longer Sequences "
        "(arXiv:2007.14062)", 2020, ("FP", "M"), "O(N)", False),
}

QUADRATIC = {"O(N²)"}


def is_subquadratic(name: str) -> bool:
    """True where the survey's complexity grows slower than N² at fixed options. Memory Compressed
    (O(N_c²), N_c = N / compression) is quadratic with a smaller constant, so it is not."""
    return claimed_exponent(name) < 2.0


def avoids_n_by_n(name: str) -> bool:
    """True where the survey claims less than a full N × N score matrix (all but O(N²))."""
    return SURVEY_TABLE[name].complexity not in QUADRATIC


def claimed_exponent(name: str) -> float:
    """The exponent of N the survey's complexity implies at fixed window / features / blocks."""
    complexity = SURVEY_TABLE[name].complexity
    if complexity in QUADRATIC or complexity == "O(N_c²)":
        return 2.0
    if "√N" in complexity:
        return 1.5
    return 1.0  # O(N), O(N log N), O(kN), O(N·m), O(N(k+m)), O(B²) at fixed block count per query
