"""Varied sentences for the embedding tests: short and long, plain and punctuated, numbers,
code, other scripts, and a few longer than all-MiniLM's 256-token window (truncation)."""
from __future__ import annotations

import itertools

_SUBJECTS = ["The old fisherman", "A small robot", "My neighbour's cat", "The city council",
             "An astronaut", "The chemistry teacher", "Our football team", "A hungry fox",
             "The quiet librarian", "Two students"]
_ACTIONS = ["repaired the broken bridge", "wrote a letter to the newspaper",
            "discovered a hidden cave", "baked bread before sunrise", "lost the keys again",
            "planted tomatoes in the garden", "won the regional championship",
            "studied the migration of birds", "sold the house by the river",
            "forgot the meeting on Tuesday"]
_ENDINGS = [".", "!", "?", " yesterday.", " in 1999.", ", and everyone cheered.",
            " despite the heavy rain.", "; nobody knows why.", " (again).", " — really."]
_EXTRA = [
    "", " ", "a", "OK", "Hello, world!", "42", "3.14159 is approximately pi.",
    "def add(a, b):\n    return a + b", "SELECT name FROM users WHERE age > 30;",
    "Le chat dort sur le canapé.", "Der Hund läuft schnell durch den Park.",
    "El tren sale a las ocho de la mañana.", "東京は日本の首都です。", "Привет, как дела?",
    "émojis 🎉🚀 and symbols ©®™", "UPPERCASE WORDS SHOUTING LOUDLY", "tabs\tand\nnew lines",
    "https://example.com/path?query=1&b=2", "user@example.org wrote: thanks!!!",
    "The quick brown fox jumps over the lazy dog. " * 40,
    "Numbers 1 2 3 4 5 6 7 8 9 10 " * 30,
    " ".join(f"word{i}" for i in range(400)),
]


def sentences(count: int = 220) -> list[str]:
    """`count` distinct, deterministic sentences (the _EXTRA ones first)."""
    made = list(_EXTRA)
    for subject, action, ending in itertools.product(_SUBJECTS, _ACTIONS, _ENDINGS):
        if len(made) >= count:
            break
        made.append(f"{subject} {action}{ending}")
    return made[:count]


# (query, the document that answers it): one clear answer each, among the 20 documents
RETRIEVAL = [
    ("Where is the Eiffel Tower?", "The Eiffel Tower stands in Paris, France."),
    ("How do plants make food?", "Photosynthesis lets plants turn sunlight into sugar."),
    ("What is the capital of Japan?", "Tokyo is the capital city of Japan."),
    ("Who wrote Hamlet?", "Hamlet is a tragedy written by William Shakespeare."),
    ("How fast does light travel?", "Light moves at about 300,000 kilometres per second."),
    ("What do bees produce?", "Honey bees make honey and beeswax."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea level."),
    ("Which planet is the largest?", "Jupiter is the largest planet in the solar system."),
    ("How do I sort a list in Python?", "Use sorted(items) or items.sort() to order a Python list."),
    ("What causes tides?", "Ocean tides are caused mainly by the Moon's gravity."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa."),
    ("What is the main ingredient of guacamole?", "Guacamole is made mostly from mashed avocado."),
    ("How long is a marathon?", "A marathon race is 42.195 kilometres long."),
    ("What language is spoken in Brazil?", "Portuguese is the official language of Brazil."),
    ("Why is the sky blue?", "Air molecules scatter blue sunlight more than red light."),
    ("What is the tallest mountain?", "Mount Everest is the highest mountain above sea level."),
    ("How do vaccines work?", "Vaccines train the immune system to recognise a pathogen."),
    ("What currency does the UK use?", "The United Kingdom uses the pound sterling."),
    ("When did humans land on the Moon?", "Apollo 11 landed astronauts on the Moon in 1969."),
]
