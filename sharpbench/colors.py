"""One colour per method, the same in every figure (curves, sharpness figures, toy figures).

``method_color(name)`` accepts a method's config name (``friendly_sam``) or its label
(``FriendlySAM``, ``SSAM-F``, ``A²SAM``): case, punctuation and superscripts are ignored. Methods
not in the table get a colour from ``EXTRA_COLORS`` chosen by a hash of the name, so a method keeps
its colour from one figure (and one process) to the next; within a process, a second unknown
method whose hash lands on a colour already given to another unknown method takes the next free
one.
"""
from __future__ import annotations

import zlib

# matplotlib's tab10 for the paper's methods, first the four of Feldman 2025 (Table 1)
METHOD_COLORS = {
    "sgd": "#4d4d4d",          # dark grey: the baseline
    "sam": "#1f77b4",          # blue
    "friendly_sam": "#2ca02c",  # green
    "ssam_f": "#d62728",       # red
    "asam": "#ff7f0e",         # orange
    "ssam_d": "#9467bd",       # purple
    "imb_sam": "#8c564b",      # brown
    "a2sam": "#e377c2",        # pink
    "hatam": "#bcbd22",        # olive
    "xsam": "#17becf",         # cyan
    "gsam": "#393b79",         # indigo
    "looksam": "#637939",      # dark olive green
    "msam": "#d6616b",         # rose
    "esam": "#e6550d",         # dark orange
    "saf": "#31a354",          # mid green
    "mesa": "#756bb1",         # slate purple
    "eg_sam": "#3182bd",       # steel blue
    "og_sam": "#9ecae1",       # light blue
    "adam": "#ad494a",
    "adamw": "#843c39",
    "rmsprop": "#7b4173",
}
# methods not in METHOD_COLORS (tab20b, none of them close to a colour above)
EXTRA_COLORS = ("#6b6ecf", "#b5cf6b", "#e7ba52", "#a55194", "#9c9ede", "#8c6d31", "#ce6dbd",
                "#cedb9c")

_SUPERSCRIPTS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹", "0123456789")
_KNOWN = {}
_assigned: dict[str, str] = {}   # unknown method key -> colour, this process


def method_key(name: str) -> str:
    """'FriendlySAM', 'friendly_sam', 'Friendly-SAM' -> 'friendlysam' (what is compared)."""
    return "".join(c for c in str(name).translate(_SUPERSCRIPTS).lower() if c.isalnum())


_KNOWN.update({method_key(k): v for k, v in METHOD_COLORS.items()})


def method_color(name: str) -> str:
    """The colour of method ``name`` (a hex string)."""
    key = method_key(name)
    if key in _KNOWN:
        return _KNOWN[key]
    if key not in _assigned:
        taken = set(_assigned.values())
        start = zlib.crc32(key.encode()) % len(EXTRA_COLORS)
        free = [EXTRA_COLORS[(start + i) % len(EXTRA_COLORS)] for i in range(len(EXTRA_COLORS))]
        _assigned[key] = next((c for c in free if c not in taken), EXTRA_COLORS[start])
    return _assigned[key]
