"""Non-ASCII text as LaTeX that pdflatex typesets with no unicode set-up (OT1 or T1, any inputenc).

Labels, paths and warnings come from users' files: CJK, math symbols, emoji. Every non-ASCII character
becomes ASCII LaTeX, so a card's or a comparison's fragment compiles in any paper:
  - accented Latin letters as accent commands (é -> \\'{e}, ǖ -> \\={\\"{u}}),
  - letters and symbols LaTeX names (ß, ø, Greek, ∑, ≤, ✓ ...) as those commands,
  - anything else as its code point in typewriter type, [U+91CF], so the reader still sees what it was.
Control characters become spaces (tab, vertical tab, form feed) or their code point.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Dict

__all__ = ["tex_unicode", "TEX_SYMBOLS"]

# combining marks with an accent command that works in OT1 as well as T1 (ogonek \k is T1 only)
_ACCENTS = {"\u0300": "\\`", "\u0301": "\\'", "\u0302": "\\^", "\u0303": "\\~", "\u0304": "\\=", "\u0306": "\\u",
            "\u0307": "\\.", "\u0308": '\\"', "\u030a": "\\r", "\u030b": "\\H", "\u030c": "\\v", "\u0323": "\\d",
            "\u0327": "\\c", "\u0331": "\\b"}
_ABOVE = {"\u0323", "\u0327", "\u0331"}       # marks below: i and j keep their dot

_GREEK = {"α": "alpha", "β": "beta", "γ": "gamma", "δ": "delta", "ε": "epsilon", "ζ": "zeta", "η": "eta",
          "θ": "theta", "ι": "iota", "κ": "kappa", "λ": "lambda", "μ": "mu", "ν": "nu", "ξ": "xi", "π": "pi",
          "ρ": "rho", "σ": "sigma", "ς": "varsigma", "τ": "tau", "υ": "upsilon", "φ": "varphi", "ϕ": "phi",
          "χ": "chi", "ψ": "psi", "ω": "omega", "ϵ": "epsilon", "ϑ": "vartheta", "ϱ": "varrho", "ϖ": "varpi",
          "Γ": "Gamma", "Δ": "Delta", "Θ": "Theta", "Λ": "Lambda", "Ξ": "Xi", "Π": "Pi", "Σ": "Sigma",
          "Υ": "Upsilon", "Φ": "Phi", "Ψ": "Psi", "Ω": "Omega"}

_MATH = {"±": "pm", "∓": "mp", "×": "times", "÷": "div", "·": "cdot", "⋅": "cdot", "∗": "ast", "∘": "circ",
         "•": "bullet", "¬": "neg", "≤": "leq", "≥": "geq", "≠": "neq", "≈": "approx", "≡": "equiv", "∼": "sim",
         "≃": "simeq", "≅": "cong", "∝": "propto", "≪": "ll", "≫": "gg", "∞": "infty", "∑": "sum", "∏": "prod",
         "∫": "int", "√": "surd", "∂": "partial", "∇": "nabla", "∈": "in", "∉": "notin", "∋": "ni",
         "⊂": "subset", "⊃": "supset", "⊆": "subseteq", "⊇": "supseteq", "∪": "cup", "∩": "cap",
         "∀": "forall", "∃": "exists", "∅": "emptyset", "∧": "wedge", "∨": "vee", "⊕": "oplus", "⊗": "otimes",
         "→": "rightarrow", "←": "leftarrow", "↑": "uparrow", "↓": "downarrow", "↔": "leftrightarrow",
         "⇒": "Rightarrow", "⇐": "Leftarrow", "⇔": "Leftrightarrow", "↦": "mapsto", "ℓ": "ell",
         "ℏ": "hbar", "ℵ": "aleph", "′": "prime", "″": "prime\\prime", "⟨": "langle", "⟩": "rangle",
         "⌈": "lceil", "⌉": "rceil", "⌊": "lfloor", "⌋": "rfloor", "∥": "parallel", "⊥": "perp",
         "†": "dagger", "‡": "ddagger", "✓": "surd", "✔": "surd", "✗": "times", "✘": "times",
         "⋯": "cdots", "∣": "mid"}

_TEXT = {"ß": "\\ss{}", "æ": "\\ae{}", "Æ": "\\AE{}", "œ": "\\oe{}", "Œ": "\\OE{}", "ø": "\\o{}", "Ø": "\\O{}",
         "ł": "\\l{}", "Ł": "\\L{}", "ı": "\\i{}", "ȷ": "\\j{}", "å": "\\aa{}", "Å": "\\AA{}",
         "¡": "\\textexclamdown{}", "¿": "\\textquestiondown{}", "£": "\\pounds{}", "§": "\\S{}", "¶": "\\P{}",
         "©": "\\copyright{}", "‘": "`", "’": "'", "‚": ",", "“": "``", "”": "''", "\u00a0": "~",
         "\u2009": "\\,", "\u202f": "\\,", "\u2002": "\\enspace{}", "\u2003": "\\quad{}", "−": "$-$",
         "‐": "-", "‑": "-", "‒": "--", "―": "---", "…": "\\ldots{}", "¹": "$^{1}$", "²": "$^{2}$",
         "³": "$^{3}$", "½": "$\\frac{1}{2}$", "¼": "$\\frac{1}{4}$", "¾": "$\\frac{3}{4}$", "°": "$^{\\circ}$",
         "€": "EUR", "™": "(TM)", "®": "(R)"}

# one table of every named character (the tests compile all of it)
TEX_SYMBOLS: Dict[str, str] = {**_TEXT, **{c: f"$\\{n}$" for c, n in {**_GREEK, **_MATH}.items()},
                               "ℹ": "\\textbf{i}", "⚠": "\\textbf{!}"}
_DROP = {"\ufe0e", "\ufe0f", "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff"}   # presentation-only, zero width


def _accented(ch: str):
    """é -> \\'{e}; None when ch is not an ASCII letter under OT1 accents."""
    base, *marks = unicodedata.normalize("NFD", ch)
    if not marks or not ("a" <= base.lower() <= "z") or any(m not in _ACCENTS for m in marks):
        return None
    out = base
    if base in "ij" and any(m not in _ABOVE for m in marks):
        out = "\\" + base     # dotless i / j under an accent above
    for m in marks:
        out = f"{_ACCENTS[m]}{{{out}}}"
    return out


def _char(ch: str) -> str:
    if ch in TEX_SYMBOLS:
        return TEX_SYMBOLS[ch]
    if ch in _DROP:
        return ""
    if ch in "\t\v\f":
        return " "
    return _accented(ch) or f"\\texttt{{[U+{ord(ch):04X}]}}"


_NOT_PRINTABLE_ASCII = re.compile(r"[^\n\r\x20-\x7e]")


def tex_unicode(text: str) -> str:
    """text with every character outside printable ASCII replaced as above (newlines left as they are)."""
    return _NOT_PRINTABLE_ASCII.sub(lambda m: _char(m.group(0)), text)
