"""Counting words."""

import re
from collections import Counter

_WORD = re.compile(r"[a-z']+")


def words(text):
    """The words of ``text``, lower-cased, in order."""
    return _WORD.findall(text.lower())


def word_count(text):
    return len(words(text))


def average_word_length(text):
    found = words(text)
    if not found:
        return 0.0
    return sum(len(w) for w in found) / len(found)


def top_words(text, n):
    """The ``n`` most common words with their counts, most common first, ties alphabetical."""
    counts = Counter(words(text))
    return sorted(counts.items(), key=lambda item: item[1])[:n]
