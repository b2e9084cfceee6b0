import unittest

from textstats import average_word_length, top_words, word_count

TEXT = "the cat and the dog and the bird"


class TestCounts(unittest.TestCase):
    def test_word_count(self):
        self.assertEqual(word_count(TEXT), 8)

    def test_average_word_length(self):
        self.assertAlmostEqual(average_word_length("ab abcd"), 3.0)
        self.assertEqual(average_word_length(""), 0.0)


class TestTopWords(unittest.TestCase):
    def test_most_common_first(self):
        self.assertEqual(top_words(TEXT, 2), [("the", 3), ("and", 2)])

    def test_ties_are_alphabetical(self):
        self.assertEqual(top_words(TEXT, 5)[2:], [("bird", 1), ("cat", 1), ("dog", 1)])

    def test_empty(self):
        self.assertEqual(top_words("", 3), [])


if __name__ == "__main__":
    unittest.main()
