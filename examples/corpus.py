"""fastnn's default training text, generated here: a small deterministic grammar of short English
sentences (no downloaded or copied text).

The grammar has about 120 words in seven sentence shapes, so a character model first learns
the alphabet and spacing, then the words, then agreement ("the fox runs" / "the foxes run") and
the shapes of sentences: a loss that falls visibly within a few hundred steps.

    python examples/corpus.py --chars 20000 > sample.txt     # write some to a file
    from corpus import generate; text = generate(400_000)     # or use it in Python

The same (n_chars, seed) gives the same text on every Python 3 (random.Random with an int seed).
"""

import argparse
import random
import sys

# (singular, plural) nouns, and verbs as (3rd person singular, plural, past).
ANIMALS = [
    ("fox", "foxes"),
    ("cat", "cats"),
    ("dog", "dogs"),
    ("owl", "owls"),
    ("goat", "goats"),
    ("horse", "horses"),
    ("crow", "crows"),
    ("mouse", "mice"),
    ("wolf", "wolves"),
    ("hare", "hares"),
]
PEOPLE = [
    ("miller", "millers"),
    ("farmer", "farmers"),
    ("child", "children"),
    ("baker", "bakers"),
    ("sailor", "sailors"),
    ("teacher", "teachers"),
    ("king", "kings"),
    ("queen", "queens"),
]
THINGS = [
    ("apple", "apples"),
    ("stone", "stones"),
    ("letter", "letters"),
    ("lamp", "lamps"),
    ("boat", "boats"),
    ("key", "keys"),
    ("loaf", "loaves"),
    ("song", "songs"),
    ("map", "maps"),
]
PLACES = [
    "the mill",
    "the river",
    "the old bridge",
    "the market",
    "the hill",
    "the harbour",
    "the forest",
    "the village",
    "the garden",
    "the tower",
]
ADJECTIVES = [
    "little",
    "old",
    "quick",
    "quiet",
    "grey",
    "brave",
    "sleepy",
    "clever",
    "hungry",
    "red",
    "tall",
]
MOTION = [("runs", "run", "ran"), ("walks", "walk", "walked"), ("goes", "go", "went")]
TRANSITIVE = [
    ("finds", "find", "found"),
    ("carries", "carry", "carried"),
    ("sees", "see", "saw"),
    ("hides", "hide", "hid"),
    ("wants", "want", "wanted"),
    ("brings", "bring", "brought"),
]
TIMES = ["at dawn", "at noon", "in the evening", "at night", "every morning", "in the rain"]
NUMBERS = ["two", "three", "four", "five", "six", "seven"]


class _Grammar:
    def __init__(self, rng):
        self.r = rng

    def pick(self, seq):
        return self.r.choice(seq)

    def noun_phrase(self, nouns, plural=None):
        """Returns (text, plural)."""
        plural = self.r.random() < 0.3 if plural is None else plural
        sing, plur = self.pick(nouns)
        word = plur if plural else sing
        if self.r.random() < 0.5:
            word = f"{self.pick(ADJECTIVES)} {word}"
        if plural:
            det = self.pick(["the", "the", "some", self.pick(NUMBERS)])
        else:
            det = self.pick(["the", "the", "a", "my", "her", "his"])
            if det == "a" and word[0] in "aeiou":
                det = "an"
        return f"{det} {word}", plural

    def actor(self):
        return self.noun_phrase(self.pick([ANIMALS, PEOPLE]))

    def sentence(self):
        shape = self.r.randrange(7)
        subj, plural = self.actor()
        tense = self.r.randrange(3)  # 0 present, 1 past, 2 present (present is more common)
        verb_form = (lambda v: v[2]) if tense == 1 else (lambda v: v[1] if plural else v[0])
        if shape == 0:
            s = f"{subj} {verb_form(self.pick(MOTION))} to {self.pick(PLACES)} {self.pick(TIMES)}."
        elif shape == 1:
            obj, _ = self.noun_phrase(THINGS)
            s = f"{subj} {verb_form(self.pick(TRANSITIVE))} {obj} near {self.pick(PLACES)}."
        elif shape == 2:
            obj, _ = self.actor()
            s = f"{subj} {verb_form(self.pick(TRANSITIVE))} {obj}."
        elif shape == 3:
            be = ("were" if plural else "was") if tense == 1 else ("are" if plural else "is")
            s = f"{subj} {be} {self.pick(ADJECTIVES)} {self.pick(TIMES)}."
        elif shape == 4:
            aux = "do" if plural else "does"
            s = f"where {aux} {subj} {self.pick(MOTION)[1]} {self.pick(TIMES)}?"
        elif shape == 5:
            who, _ = self.noun_phrase(PEOPLE, plural=False)
            obj, _ = self.noun_phrase(THINGS)
            s = f'"give me {obj}," said {who}.'
        else:
            obj, _ = self.noun_phrase(THINGS, plural=True)
            first = f"{subj} {verb_form(self.pick(TRANSITIVE))} {obj}"
            second_subj, p2 = self.actor()
            second = f"{second_subj} {(lambda v: v[1] if p2 else v[0])(self.pick(MOTION))} home"
            s = f"{first}, and {second}."
        i = 1 if s[0] == '"' else 0
        return s[:i] + s[i].upper() + s[i + 1 :]

    def paragraph(self):
        return " ".join(self.sentence() for _ in range(self.r.randrange(2, 6)))


def generate(n_chars=400_000, seed=0):
    """About `n_chars` characters (cut at a paragraph end at or after n_chars) of the grammar's
    text: paragraphs of 2-5 sentences separated by newlines. Deterministic in (n_chars, seed)."""
    g = _Grammar(random.Random(seed))
    parts, total = [], 0
    while total < n_chars:
        p = g.paragraph() + "\n"
        parts.append(p)
        total += len(p)
    return "".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chars", type=int, default=400_000, help="about this many characters")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    sys.stdout.write(generate(args.chars, args.seed))


if __name__ == "__main__":
    main()
