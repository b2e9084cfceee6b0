"""textstats: word statistics of a text."""

from textstats.core import average_word_length, top_words, word_count, words

__all__ = ["average_word_length", "top_words", "word_count", "words"]
