"""Generate the three starter data sets in examples/volumes/data/ (deterministic, no downloads).

Each starter has a training file and a held-out test file (the task evaluation set):

* ``text-classification.jsonl`` (600) / ``-test.jsonl`` (200) - prompt-completion,
  ``"Review: <text>\\nSentiment:"`` -> ``" positive"`` / ``" negative"``. Reviews of
  restaurants, hotels, products, films, books, apps, services, trips, events and courses,
  composed from per-domain subjects and per-kind predicates in many sentence shapes: plain
  statements, pairs, verdicts, fragments, contrasts ("the room was a bit small, but the staff
  were wonderful"), negations ("wasn't bad at all", "not worth the money") and minimal pairs
  ("I can't recommend this hotel" / "... enough"). Both files are exactly 50/50, so a
  constant answerer scores 50 %.
* ``question-answering.jsonl`` (400) / ``-test.jsonl`` (100) - chat, one user question and
  a short assistant answer ("Lima", "Peruvian sol", "Au", "56"): capitals, currencies,
  continents and main languages of 66 countries, chemical symbols (both ways), everyday
  counts and small arithmetic. Answers are short so that exact match measures both knowing
  the fact and answering in the expected form.
* ``code-generation.jsonl`` (400) / ``-test.jsonl`` (100) - prompt-completion plus a
  ``"tests"`` key: a Python comment asking for a small function with its signature
  (``"# Write a function is_even(n) that returns True when n is even.\\n"``), the function
  as the completion, and ``assert`` lines (starting with a newline) that pass when appended
  to prompt + completion. 75 task families (arithmetic, predicates, strings, lists, ...),
  each with several function names, parameter names and wordings. Every record is checked
  here: prompt + completion + tests runs without error.

How the split is made, so that the test files measure generalisation and not recall:

* classification: a pool of distinct reviews is drawn; the first 100 positive and 100
  negative go to test, and a review enters training only if none of its (subject,
  predicate) pairs occurs in a test review - every test review combines words in a way
  training never shows (the words themselves all occur in training);
* question answering: the unit is the fact (relation, entity), e.g. (capital, Peru); test
  facts never appear in training under any phrasing (an element is held out with both of
  its questions, symbol -> name and name -> symbol);
* code: the unit is (family, function name, parameter names); the test units are held out,
  and every test family also appears in training under other names.

Files are de-duplicated after normalisation (every string's whitespace collapsed), no test
prompt occurs in training, and ``main`` asserts all of this (so do the unit tests in
tests/unit/runtime/train/test_train_data.py). Records stay short (at most about 48 / 64 /
96 tokens with SmolLM2's tokenizer and chat template) so that fine-tunes on a CPU are quick.

Regenerate with ``python examples/make_starters.py``. ``kubeforge run`` seeds each pvc://
claim from ``examples/volumes/<claim>``, so ``pvc://data/code-generation.jsonl`` is the file
here.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
OUT = HERE / "volumes" / "data"

# --- text classification ------------------------------------------------------------------------
#
# A subject is (phrase, plural, kind); a kind selects the predicates that fit it. Per kind:
# positive, negative, positives whose negation is negative ("wasn't clean"), negatives whose
# negation is positive ("wasn't noisy at all") and mild negatives for concessions.

KINDS: dict[str, dict[str, list[str]]] = {
    "food": {
        "pos": ["delicious", "fresh and tasty", "perfectly cooked", "full of flavour", "generous", "tasty",
                "beautifully presented", "mouth-watering"],
        "neg": ["bland", "cold", "greasy", "overcooked", "stale", "tasteless", "undercooked", "soggy", "inedible",
                "burnt"],
        "not_pos": ["fresh", "hot", "cooked properly", "as good as it looked"],
        "not_neg": ["bland at all", "greasy at all", "too spicy at all"],
        "mild_neg": ["a little salty", "a bit small", "slightly too sweet", "a bit pricey"],
    },
    "person": {
        "pos": ["friendly", "helpful", "attentive", "kind and patient", "professional", "welcoming", "polite",
                "charming", "knowledgeable"],
        "neg": ["rude", "unhelpful", "dismissive", "careless", "unprofessional", "clueless", "arrogant", "useless"],
        "not_pos": ["friendly", "helpful", "interested in helping", "polite"],
        "not_neg": ["pushy at all", "rude in the slightest"],
        "mild_neg": ["a bit slow", "a little rushed", "a bit quiet"],
    },
    "performer": {
        "pos": ["brilliant", "convincing", "charismatic", "superb", "magnetic", "excellent", "captivating"],
        "neg": ["wooden", "unconvincing", "flat", "awkward", "dreadful", "forgettable"],
        "not_pos": ["convincing", "believable", "any good"],
        "not_neg": ["wooden at all", "awkward at all"],
        "mild_neg": ["a bit stiff", "a little quiet"],
    },
    "service": {
        "pos": ["quick", "fast and friendly", "efficient", "seamless", "prompt", "excellent"],
        "neg": ["slow", "painfully slow", "chaotic", "useless", "a shambles", "sloppy"],
        "not_pos": ["quick", "organised", "reliable"],
        "not_neg": ["slow at all", "a hassle at all"],
        "mild_neg": ["a bit slow", "a little disorganised"],
    },
    "place": {
        "pos": ["spotless", "clean and quiet", "comfortable", "cosy", "spacious", "beautiful", "stunning",
                "peaceful"],
        "neg": ["filthy", "noisy", "cramped", "dirty", "shabby", "freezing", "smelly", "run-down"],
        "not_pos": ["clean", "comfortable", "quiet", "as advertised"],
        "not_neg": ["noisy at all", "cramped at all"],
        "mild_neg": ["a bit small", "slightly dated", "a little noisy", "a bit dark"],
    },
    "product": {
        "pos": ["sturdy", "reliable", "well made", "easy to use", "quiet and powerful", "solid", "durable",
                "excellent"],
        "neg": ["flimsy", "cheaply made", "broken on arrival", "unreliable", "useless", "faulty", "fragile",
                "noisy"],
        "not_pos": ["reliable", "sturdy", "fit for purpose", "as described"],
        "not_neg": ["flimsy at all", "noisy at all"],
        "mild_neg": ["a bit heavy", "a little loud", "a bit fiddly"],
    },
    "work": {
        "pos": ["gripping", "moving", "hilarious", "beautifully written", "clever", "captivating", "engaging",
                "unforgettable", "touching"],
        "neg": ["dull", "predictable", "boring", "confusing", "forgettable", "painfully slow", "clumsy", "tedious",
                "pointless"],
        "not_pos": ["funny", "interesting", "believable", "engaging"],
        "not_neg": ["boring for a second", "predictable at all"],
        "mild_neg": ["a bit long", "slow to start", "a little predictable"],
    },
    "app": {
        "pos": ["fast", "intuitive", "smooth", "easy to use", "reliable", "well designed", "simple", "snappy"],
        "neg": ["buggy", "slow", "confusing", "glitchy", "laggy", "bloated", "unusable", "clunky"],
        "not_pos": ["reliable", "intuitive", "usable", "stable"],
        "not_neg": ["buggy at all", "slow at all"],
        "mild_neg": ["a bit slow to load", "a little cluttered"],
    },
    "trip": {
        "pos": ["on time", "smooth", "comfortable", "well organised", "relaxing", "punctual", "effortless"],
        "neg": ["delayed", "chaotic", "cramped", "badly organised", "late", "exhausting", "cancelled twice"],
        "not_pos": ["on time", "comfortable", "organised"],
        "not_neg": ["late at all", "crowded at all"],
        "mild_neg": ["a few minutes late", "a bit cramped"],
    },
    "event": {
        "pos": ["electric", "unforgettable", "brilliant", "fun", "well organised", "magical"],
        "neg": ["dull", "overcrowded", "badly organised", "forgettable", "chaotic", "boring"],
        "not_pos": ["fun", "worth the ticket price", "organised"],
        "not_neg": ["crowded at all", "boring for a second"],
        "mild_neg": ["a bit crowded", "a little short"],
    },
}
GENERIC = {
    "pos": ["excellent", "superb", "wonderful", "fantastic", "brilliant", "outstanding", "great", "really good",
            "first-rate", "top notch", "a real treat", "a pleasant surprise", "better than expected", "spot on",
            "faultless", "impressive", "amazing", "lovely", "perfect"],
    "neg": ["awful", "terrible", "dreadful", "poor", "disappointing", "a letdown", "mediocre at best",
            "a complete mess", "worse than expected", "a huge disappointment", "subpar", "shoddy", "frustrating",
            "a nightmare", "appalling", "hopeless", "rubbish", "a joke"],
    "not_pos": ["great", "good at all", "anything special", "worth the hype", "up to scratch", "what I'd hoped for"],
    "not_neg": ["bad at all", "as bad as the reviews said", "disappointing in the slightest"],
    "mild_neg": ["a little pricey", "nothing fancy", "a bit basic", "not perfect"],
}
MONEY = {"pos": ["worth every penny", "great value", "excellent value for money"],
         "neg": ["a waste of money", "not worth the money", "overpriced", "a rip-off"],
         "not_pos": ["worth the money", "worth the price"]}
MILD_POS = ["fine", "okay", "decent", "nice enough", "pleasant enough", "acceptable", "good"]

# Whole clauses about a subject, and verb phrases (past tense).
ABOUT = {
    "pos": ["I can't fault {s}.", "I have nothing bad to say about {s}.", "No complaints about {s} at all.",
            "I was really impressed with {s}.", "Nothing about {s} disappointed me.", "I loved {s}."],
    "neg": ["I have nothing good to say about {s}.", "I was really disappointed with {s}.",
            "I expected much more from {s}.", "Nothing about {s} impressed me.", "I hated {s}."],
}
VERB_PHRASES = {
    "pos": ["exceeded all my expectations", "did not disappoint", "couldn't have been better", "blew me away",
            "won me over", "made our day"],
    "neg": ["fell well short of my expectations", "left a lot to be desired", "could have been much better",
            "let us down badly", "didn't live up to the hype", "ruined the whole day"],
}
VERDICTS = {
    "pos": ["Highly recommended.", "Would recommend.", "Five stars.", "Ten out of ten.", "Worth every penny.",
            "Thoroughly recommended.", "A real gem."],
    "neg": ["Not worth the money.", "Never again.", "Save your money.", "Avoid.", "I want my money back.",
            "One star.", "Would not recommend.", "Not impressed.", "Two stars at most.", "What a disappointment."],
}
OBJECT_VERDICTS = {
    "pos": ["I'd recommend {o} to anyone.", "I can't recommend {o} enough.",
            "I'll be telling all my friends about {o}."],
    "neg": ["I can't recommend {o}.", "Stay away from {o}.", "I regret choosing {o}.", "I'd think twice about {o}."],
}
OPENERS = ["", "", "", "", "Honestly, ", "Overall, ", "To be honest, ", "I have to say, ", "All in all, ",
           "In short, ", "Frankly, "]

P, S = True, False  # plural / singular subject
DOMAINS: dict[str, dict[str, Any]] = {
    "restaurant": {
        "subjects": [("the food", S, "food"), ("the pasta", S, "food"), ("the soup", S, "food"),
                     ("the steak", S, "food"), ("the curry", S, "food"), ("the pizza", S, "food"),
                     ("the dessert", S, "food"), ("the coffee", S, "food"), ("the burger", S, "food"),
                     ("the fish", S, "food"), ("the noodles", P, "food"), ("the chips", P, "food"),
                     ("our waiter", S, "person"), ("the staff", P, "person"), ("the chef", S, "person"),
                     ("the service", S, "service"), ("the terrace", S, "place"), ("the dining room", S, "place")],
        "leads": ["We went for dinner on Friday and", "We came here for a birthday lunch and",
                  "We ordered a takeaway last night and", "We stopped in for lunch and"],
        "objects": ["this restaurant", "this place", "this cafe"],
        "verdicts": {"pos": ["We'll be back."], "neg": ["We won't be back.", "Eat somewhere else."]},
        "tenses": ["past"],
    },
    "hotel": {
        "subjects": [("the room", S, "place"), ("the bed", S, "place"), ("the bathroom", S, "place"),
                     ("the pool", S, "place"), ("the lobby", S, "place"), ("the rooms", P, "place"),
                     ("the suite", S, "place"), ("the staff", P, "person"), ("the receptionist", S, "person"),
                     ("the cleaners", P, "person"), ("the breakfast", S, "food"), ("the buffet", S, "food"),
                     ("the check-in", S, "service"), ("room service", S, "service")],
        "leads": ["We stayed three nights and", "We stayed here for a week and", "I stayed here on a work trip and",
                  "We booked a weekend here and"],
        "objects": ["this hotel", "this place", "this guesthouse", "this resort"],
        "verdicts": {"pos": ["Would stay again."], "neg": ["We checked out early."]},
        "tenses": ["past"],
    },
    "headphones": {
        "subjects": [("these headphones", P, "product"), ("the battery", S, "product"),
                     ("the charging case", S, "product"), ("the ear cushions", P, "product"),
                     ("the noise cancelling", S, "product"), ("the delivery", S, "service")],
        "leads": ["I bought these a month ago and", "I've worn them daily for a week and", "I got these as a gift and"],
        "objects": ["these headphones", "this brand", "this seller"],
        "verdicts": {"pos": ["Would buy again."], "neg": ["Returned them the next day.", "Don't buy them."]},
        "tenses": ["past", "present"],
    },
    "laptop": {
        "subjects": [("the laptop", S, "product"), ("the keyboard", S, "product"), ("the trackpad", S, "product"),
                     ("the battery", S, "product"), ("the hinge", S, "product"), ("the charger", S, "product"),
                     ("the fan", S, "product"), ("the delivery", S, "service")],
        "leads": ["I bought this a month ago and", "I ordered this for my son and",
                  "I've used it daily for a week and"],
        "objects": ["this laptop", "this brand", "this model"],
        "verdicts": {"pos": ["Would buy again."], "neg": ["Returned it the next day.", "Don't buy it."]},
        "tenses": ["past", "present"],
    },
    "kitchen": {
        "subjects": [("the blender", S, "product"), ("the kettle", S, "product"), ("the toaster", S, "product"),
                     ("the coffee machine", S, "product"), ("the lid", S, "product"), ("the handle", S, "product"),
                     ("the motor", S, "product"), ("the instructions", P, "work"), ("the delivery", S, "service")],
        "leads": ["I bought this a month ago and", "I've used it every morning for a week and",
                  "I got this as a wedding present and"],
        "objects": ["this product", "this brand", "this seller"],
        "verdicts": {"pos": ["Would buy again."], "neg": ["Returned it the next day.", "Don't buy it."]},
        "tenses": ["past", "present"],
    },
    "clothing": {
        "subjects": [("this jacket", S, "product"), ("the zip", S, "product"), ("the fabric", S, "product"),
                     ("the stitching", S, "product"), ("the pockets", P, "product"), ("these boots", P, "product"),
                     ("the soles", P, "product"), ("the delivery", S, "service"),
                     ("the returns process", S, "service")],
        "leads": ["I bought this last winter and", "I've worn it every day for a month and", "I ordered it online and"],
        "objects": ["this shop", "this brand", "this seller"],
        "verdicts": {"pos": ["Would buy again."], "neg": ["Sent it straight back.", "Don't buy it."]},
        "tenses": ["past", "present"],
    },
    "film": {
        "subjects": [("the film", S, "work"), ("the plot", S, "work"), ("the acting", S, "work"),
                     ("the ending", S, "work"), ("the script", S, "work"), ("the dialogue", S, "work"),
                     ("the soundtrack", S, "work"), ("the sequel", S, "work"), ("the last hour", S, "work"),
                     ("the lead actor", S, "performer"), ("the cast", S, "performer"), ("the cinema", S, "place")],
        "leads": ["Watched it last night and", "We saw it at the cinema and", "I watched it with my kids and"],
        "objects": ["this film", "this movie"],
        "verdicts": {"pos": ["I'd watch it again."], "neg": ["I walked out halfway."]},
        "tenses": ["past", "present"],
    },
    "book": {
        "subjects": [("the book", S, "work"), ("the novel", S, "work"), ("the writing", S, "work"),
                     ("the characters", P, "work"), ("the story", S, "work"), ("the last chapter", S, "work"),
                     ("the translation", S, "work"), ("the ending", S, "work"), ("the audiobook", S, "work"),
                     ("the narrator", S, "performer")],
        "leads": ["I read it on holiday and", "I read it for my book club and", "I finished it last week and"],
        "objects": ["this book", "this novel", "this author"],
        "verdicts": {"pos": ["I couldn't put it down."], "neg": ["I gave up after fifty pages."]},
        "tenses": ["past", "present"],
    },
    "app": {
        "subjects": [("the app", S, "app"), ("the update", S, "app"), ("the interface", S, "app"),
                     ("the sync feature", S, "app"), ("the login", S, "app"), ("the new version", S, "app"),
                     ("the search", S, "app"), ("the website", S, "app"), ("customer support", S, "service")],
        "leads": ["I've used it for a month and", "I installed it yesterday and", "I switched to it last year and"],
        "objects": ["this app", "this software"],
        "verdicts": {"pos": ["Five stars from me."], "neg": ["Uninstalled."]},
        "tenses": ["past", "present"],
    },
    "services": {
        "subjects": [("the plumber", S, "person"), ("the technician", S, "person"), ("the hairdresser", S, "person"),
                     ("the electrician", S, "person"), ("the mechanic", S, "person"), ("the cleaner", S, "person"),
                     ("the repair", S, "service"), ("the booking process", S, "service"),
                     ("the haircut", S, "service"), ("the installation", S, "service"), ("the salon", S, "place")],
        "leads": ["We used them to fix a leak and", "I booked them for a boiler service and",
                  "I had my car serviced there and", "I went in for a haircut and"],
        "objects": ["this company", "this garage", "this salon", "them"],
        "verdicts": {"pos": ["I'll use them again."], "neg": ["I won't use them again."]},
        "tenses": ["past"],
    },
    "travel": {
        "subjects": [("the flight", S, "trip"), ("the train", S, "trip"), ("the ferry", S, "trip"),
                     ("the bus", S, "trip"), ("the journey", S, "trip"), ("the transfer", S, "trip"),
                     ("the crew", S, "person"), ("the tour guide", S, "person"), ("the driver", S, "person"),
                     ("the seats", P, "place"), ("the cabin", S, "place"), ("boarding", S, "service"),
                     ("the onboard meal", S, "food")],
        "leads": ["We took the early flight and", "I took the night train and", "We booked the day tour and"],
        "objects": ["this airline", "this tour", "this company"],
        "verdicts": {"pos": ["I'd book them again."], "neg": ["I'd never book them again."]},
        "tenses": ["past"],
    },
    "event": {
        "subjects": [("the concert", S, "event"), ("the show", S, "event"), ("the festival", S, "event"),
                     ("the match", S, "event"), ("the exhibition", S, "event"), ("the gig", S, "event"),
                     ("the play", S, "work"), ("the band", S, "performer"), ("the performers", P, "performer"),
                     ("the venue", S, "place"), ("the queue", S, "service")],
        "leads": ["We went on Saturday night and", "I took my parents and", "We got tickets last minute and"],
        "objects": ["this show", "this festival", "this venue"],
        "verdicts": {"pos": ["Best night out in ages."], "neg": ["We left early."]},
        "tenses": ["past"],
    },
    "course": {
        "subjects": [("the course", S, "work"), ("the lessons", P, "work"), ("the exercises", P, "work"),
                     ("the workshop", S, "event"), ("the material", S, "work"), ("the instructor", S, "person"),
                     ("the teacher", S, "person"), ("the classroom", S, "place")],
        "leads": ["I signed up in January and", "I took the evening class and", "I did the online version and"],
        "objects": ["this course", "this class", "this school"],
        "verdicts": {"pos": ["I learned a lot."], "neg": ["I learned nothing."]},
        "tenses": ["past"],
    },
}
SPEND = {"food", "place", "product", "work", "app", "trip", "event"}  # kinds that cost money


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _bare(phrase: str) -> str:
    for det in ("the ", "our ", "these ", "this "):
        if phrase.startswith(det):
            return phrase[len(det):]
    return phrase


def _copula(plural: bool, tense: str, negated: bool, rng: random.Random) -> str:
    verb = ("were" if plural else "was") if tense == "past" else ("are" if plural else "is")
    if not negated:
        return verb
    return verb + ("n't" if rng.random() < 0.6 else " not")


def _preds(kind: str, key: str, rng: random.Random) -> str:
    """A predicate of ``key`` ("pos", "neg", "not_pos", "not_neg", "mild_neg") that fits ``kind``."""
    own = KINDS[kind].get(key, [])
    if key == "mild_neg" and kind in ("person", "performer"):
        return rng.choice(own)  # "the chef was nothing fancy" does not read
    shared = GENERIC.get(key, []) + (MONEY.get(key, []) if kind in SPEND else [])
    pool = own if own and (rng.random() < 0.5 or not shared) else shared
    return rng.choice(pool)


@dataclass
class Review:
    text: str
    label: str  # "pos" or "neg"
    pairs: tuple[tuple[str, str], ...]  # (subject, predicate) combinations the review makes


class ReviewMaker:
    """Draws one review of a requested sentiment from one of ten sentence shapes."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.shapes: list[tuple[Callable[[dict, str, str], tuple[str, list] | None], int]] = [
            (self.plain, 14), (self.pair, 10), (self.with_verdict, 14), (self.contrast, 12),
            (self.although, 6), (self.negated, 13), (self.fragment, 8), (self.about, 10), (self.lead, 7),
            (self.verb_phrase, 6),
        ]

    def draw(self, label: str) -> Review:
        rng = self.rng
        while True:
            name = rng.choice(sorted(DOMAINS))
            dom = DOMAINS[name]
            tense = rng.choice(dom["tenses"])
            shape = rng.choices([s for s, _ in self.shapes], weights=[w for _, w in self.shapes])[0]
            made = shape(dom, label, tense)
            if made is None:
                continue
            text, pairs = made
            text = re.sub(r"\s+", " ", text).strip()
            if len(text.split()) > 28:
                continue
            return Review(text, label, tuple(pairs))

    # helpers
    def subject(self, dom: dict, exclude: str | None = None) -> tuple[str, bool, str]:
        return self.rng.choice([s for s in dom["subjects"] if s[0] != exclude])

    def opener(self, text: str) -> str:
        op = self.rng.choice(OPENERS)
        return op + text if op else _cap(text)

    def clause(self, subj: tuple[str, bool, str], key: str, tense: str, negated: bool = False) -> tuple[str, tuple]:
        phrase, plural, kind = subj
        pred = _preds(kind, key, self.rng)
        return f"{phrase} {_copula(plural, tense, negated, self.rng)} {pred}", (phrase, pred)

    def verdict(self, dom: dict, label: str) -> str:
        r = self.rng.random()
        if r < 0.3:
            return self.rng.choice(OBJECT_VERDICTS[label]).format(o=self.rng.choice(dom["objects"]))
        if r < 0.5:
            return self.rng.choice(dom["verdicts"][label])
        return self.rng.choice(VERDICTS[label])

    # shapes: each returns (text, pairs) or None when it does not apply
    def plain(self, dom, label, tense):
        c, pair = self.clause(self.subject(dom), label, tense)
        return self.opener(c) + ".", [pair]

    def pair(self, dom, label, tense):
        s1 = self.subject(dom)
        s2 = self.subject(dom, exclude=s1[0])
        c1, p1 = self.clause(s1, label, tense)
        c2, p2 = self.clause(s2, label, tense)
        joiner = self.rng.choice([" and ", ", and ", "; ", ". "])
        second = _cap(c2) if joiner == ". " else c2
        return self.opener(c1) + joiner + second + ".", [p1, p2]

    def with_verdict(self, dom, label, tense):
        c, pair = self.clause(self.subject(dom), label, tense)
        return self.opener(c) + ". " + self.verdict(dom, label), [pair]

    def _concession(self, subj, label, tense) -> tuple[str, tuple, bool]:
        """The conceded, opposite-sentiment clause; strong ones need a verdict to stay clear."""
        phrase, plural, kind = subj
        if self.rng.random() < 0.7:
            pred = _preds(kind, "mild_neg", self.rng) if label == "pos" else self.rng.choice(MILD_POS)
            strong = False
        else:
            pred = _preds(kind, "neg" if label == "pos" else "pos", self.rng)
            strong = True
        return f"{phrase} {_copula(plural, tense, False, self.rng)} {pred}", (phrase, pred), strong

    def contrast(self, dom, label, tense):
        s1 = self.subject(dom)
        s2 = self.subject(dom, exclude=s1[0])
        conc, p1, strong = self._concession(s1, label, tense)
        main, p2 = self.clause(s2, label, tense)
        if self.rng.random() < 0.5:
            text = f"{self.opener(conc)}, but {main}."
        else:
            text = f"{_cap(main)}, even if {conc}."
        if strong or self.rng.random() < 0.3:
            text += " " + self.verdict(dom, label)
        return text, [p1, p2]

    def although(self, dom, label, tense):
        s1 = self.subject(dom)
        s2 = self.subject(dom, exclude=s1[0])
        conc, p1, strong = self._concession(s1, label, tense)
        main, p2 = self.clause(s2, label, tense)
        text = f"{self.rng.choice(['Although', 'While', 'Even though'])} {conc}, {main}."
        if strong:
            text += " " + self.verdict(dom, label)
        return text, [p1, p2]

    def negated(self, dom, label, tense):
        # "wasn't clean" is negative; "wasn't noisy at all" is positive.
        c, pair = self.clause(self.subject(dom), "not_pos" if label == "neg" else "not_neg", tense, negated=True)
        text = self.opener(c) + "."
        if self.rng.random() < 0.4:
            text += " " + self.verdict(dom, label)
        return text, [(pair[0], "not " + pair[1])]

    def fragment(self, dom, label, tense):
        subs = [s for s in dom["subjects"] if s[0].startswith(("the ", "these ", "this "))]
        s1 = self.rng.choice(subs)
        s2 = self.rng.choice([s for s in subs if s[0] != s1[0]])
        words = []
        for phrase, _, kind in (s1, s2):
            adjs = [a for a in KINDS[kind][label] + GENERIC[label] if " " not in a and a != "late"]
            words.append((self.rng.choice(adjs), _bare(phrase), phrase))
        (a1, b1, f1), (a2, b2, f2) = words
        joiner = self.rng.choice([", ", " and ", ", really "])
        text = f"{_cap(a1)} {b1}{joiner}{a2} {b2}."
        if self.rng.random() < 0.5:
            text += " " + self.verdict(dom, label)
        return text, [(f1, a1), (f2, a2)]

    def about(self, dom, label, tense):
        phrase = self.subject(dom)[0]
        tmpl = self.rng.choice(ABOUT[label])
        text = tmpl.format(s=phrase)
        if self.rng.random() < 0.35:
            text += " " + self.verdict(dom, label)
        return text, [(phrase, tmpl)]

    def lead(self, dom, label, tense):
        c, pair = self.clause(self.subject(dom), label, "past")
        return f"{self.rng.choice(dom['leads'])} {c}.", [pair]

    def verb_phrase(self, dom, label, tense):
        phrase = self.subject(dom)[0]
        vp = self.rng.choice(VERB_PHRASES[label])
        text = f"{self.opener(phrase)} {vp}."
        if self.rng.random() < 0.3:
            text += " " + self.verdict(dom, label)
        return text, [(phrase, vp)]


def _norm_text(s: str) -> str:
    return " ".join(s.split()).casefold()


def classification(seed: int = 1234, n_train: int = 600, n_test: int = 200) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    maker = ReviewMaker(rng)
    pool: list[Review] = []
    seen: set[str] = set()
    for i in range(12000):
        r = maker.draw("pos" if i % 2 == 0 else "neg")
        key = _norm_text(r.text)
        if key not in seen:
            seen.add(key)
            pool.append(r)
    skip: set[int] = set()  # test candidates dropped because training cannot teach a predicate of theirs
    while True:
        test: list[Review] = []
        counts = {"pos": 0, "neg": 0}
        for i, r in enumerate(pool):
            if i not in skip and counts[r.label] < n_test // 2:
                counts[r.label] += 1
                test.append(r)
        held = {p for r in test for p in r.pairs}
        eligible = [r for r in pool if r not in test and not held.intersection(r.pairs)]
        # Every predicate the test uses is taught in training (on other subjects): first one
        # eligible review per test predicate, then the rest in pool order.
        first: dict[str, int] = {}
        for i, r in enumerate(eligible):
            for _, p in r.pairs:
                first.setdefault(p, i)
        wanted = sorted({first[p] for r in test for _, p in r.pairs if p in first})
        order = wanted + [i for i in range(len(eligible)) if i not in set(wanted)]
        train: list[Review] = []
        counts = {"pos": 0, "neg": 0}
        for i in order:
            r = eligible[i]
            if counts[r.label] < n_train // 2:
                counts[r.label] += 1
                train.append(r)
        taught = {p for r in train for _, p in r.pairs}
        untaught = [pool.index(r) for r in test if any(p not in taught for _, p in r.pairs)]
        if not untaught:
            break
        skip.update(untaught)
    train.sort(key=pool.index)
    assert len(train) == n_train and len(test) == n_test, (len(train), len(test))

    def row(r: Review) -> dict:
        label = " positive" if r.label == "pos" else " negative"
        return {"prompt": f"Review: {r.text}\nSentiment:", "completion": label}

    return [row(r) for r in train], [row(r) for r in test]


# --- question answering --------------------------------------------------------------------------

# country, capital, currency, continent, most widely spoken language (None: no single clear answer)
COUNTRIES: list[tuple[str, str | None, str | None, str | None, str | None]] = [
    ("France", "Paris", "euro", "Europe", "French"),
    ("Germany", "Berlin", "euro", "Europe", "German"),
    ("Italy", "Rome", "euro", "Europe", "Italian"),
    ("Spain", "Madrid", "euro", "Europe", "Spanish"),
    ("Portugal", "Lisbon", "euro", "Europe", "Portuguese"),
    ("Greece", "Athens", "euro", "Europe", "Greek"),
    ("Ireland", "Dublin", "euro", "Europe", "English"),
    ("the Netherlands", "Amsterdam", "euro", "Europe", "Dutch"),
    ("Austria", "Vienna", "euro", "Europe", "German"),
    ("Finland", "Helsinki", "euro", "Europe", "Finnish"),
    ("Croatia", "Zagreb", "euro", "Europe", "Croatian"),
    ("Poland", "Warsaw", "Polish zloty", "Europe", "Polish"),
    ("Sweden", "Stockholm", "Swedish krona", "Europe", "Swedish"),
    ("Norway", "Oslo", "Norwegian krone", "Europe", "Norwegian"),
    ("Denmark", "Copenhagen", "Danish krone", "Europe", "Danish"),
    ("Hungary", "Budapest", "Hungarian forint", "Europe", "Hungarian"),
    ("the Czech Republic", "Prague", "Czech koruna", "Europe", "Czech"),
    ("Switzerland", "Bern", "Swiss franc", "Europe", None),
    ("the United Kingdom", "London", "pound sterling", "Europe", "English"),
    ("Ukraine", "Kyiv", "Ukrainian hryvnia", "Europe", "Ukrainian"),
    ("Romania", "Bucharest", "Romanian leu", "Europe", "Romanian"),
    ("Iceland", "Reykjavik", "Icelandic krona", "Europe", "Icelandic"),
    ("Japan", "Tokyo", "Japanese yen", "Asia", "Japanese"),
    ("China", "Beijing", "Chinese yuan", "Asia", "Mandarin"),
    ("South Korea", "Seoul", "South Korean won", "Asia", "Korean"),
    ("India", "New Delhi", "Indian rupee", "Asia", "Hindi"),
    ("Thailand", "Bangkok", "Thai baht", "Asia", "Thai"),
    ("Vietnam", "Hanoi", "Vietnamese dong", "Asia", "Vietnamese"),
    ("Indonesia", "Jakarta", "Indonesian rupiah", "Asia", "Indonesian"),
    ("the Philippines", "Manila", "Philippine peso", "Asia", None),
    ("Malaysia", "Kuala Lumpur", "Malaysian ringgit", "Asia", "Malay"),
    ("Pakistan", "Islamabad", "Pakistani rupee", "Asia", None),
    ("Bangladesh", "Dhaka", "Bangladeshi taka", "Asia", "Bengali"),
    ("Nepal", "Kathmandu", "Nepalese rupee", "Asia", "Nepali"),
    ("Iran", "Tehran", "Iranian rial", "Asia", "Persian"),
    ("Iraq", "Baghdad", "Iraqi dinar", "Asia", "Arabic"),
    ("Saudi Arabia", "Riyadh", "Saudi riyal", "Asia", "Arabic"),
    ("Mongolia", "Ulaanbaatar", "Mongolian tugrik", "Asia", "Mongolian"),
    ("Egypt", "Cairo", "Egyptian pound", "Africa", "Arabic"),
    ("Kenya", "Nairobi", "Kenyan shilling", "Africa", None),
    ("Nigeria", "Abuja", "Nigerian naira", "Africa", None),
    ("Ethiopia", "Addis Ababa", "Ethiopian birr", "Africa", None),
    ("Morocco", "Rabat", "Moroccan dirham", "Africa", "Arabic"),
    ("Ghana", "Accra", "Ghanaian cedi", "Africa", None),
    ("South Africa", None, "South African rand", "Africa", None),
    ("Algeria", "Algiers", "Algerian dinar", "Africa", "Arabic"),
    ("Tunisia", "Tunis", "Tunisian dinar", "Africa", "Arabic"),
    ("Tanzania", "Dodoma", "Tanzanian shilling", "Africa", "Swahili"),
    ("Uganda", "Kampala", "Ugandan shilling", "Africa", None),
    ("Zambia", "Lusaka", "Zambian kwacha", "Africa", None),
    ("Angola", "Luanda", "Angolan kwanza", "Africa", "Portuguese"),
    ("the United States", "Washington, D.C.", "US dollar", "North America", "English"),
    ("Canada", "Ottawa", "Canadian dollar", "North America", None),
    ("Mexico", "Mexico City", "Mexican peso", "North America", "Spanish"),
    ("Cuba", "Havana", "Cuban peso", "North America", "Spanish"),
    ("Jamaica", "Kingston", "Jamaican dollar", "North America", "English"),
    ("Guatemala", "Guatemala City", "Guatemalan quetzal", "North America", "Spanish"),
    ("Costa Rica", "San Jose", "Costa Rican colon", "North America", "Spanish"),
    ("Brazil", "Brasilia", "Brazilian real", "South America", "Portuguese"),
    ("Argentina", "Buenos Aires", "Argentine peso", "South America", "Spanish"),
    ("Chile", "Santiago", "Chilean peso", "South America", "Spanish"),
    ("Peru", "Lima", "Peruvian sol", "South America", "Spanish"),
    ("Colombia", "Bogota", "Colombian peso", "South America", "Spanish"),
    ("Venezuela", "Caracas", "Venezuelan bolivar", "South America", "Spanish"),
    ("Uruguay", "Montevideo", "Uruguayan peso", "South America", "Spanish"),
    ("Ecuador", "Quito", "US dollar", "South America", "Spanish"),
    ("Australia", "Canberra", "Australian dollar", None, "English"),
    ("New Zealand", "Wellington", "New Zealand dollar", None, "English"),
]
COUNTRY_QUESTIONS = {
    "capital": ["What is the capital of {c}?", "What is the capital city of {c}?", "Which city is the capital of {c}?",
                "Name the capital of {c}."],
    "currency": ["What currency is used in {c}?", "What is the currency of {c}?", "Which currency does {c} use?"],
    "continent": ["On which continent is {c}?", "Which continent is {c} in?", "{C} is on which continent?"],
    "language": ["What language do most people in {c} speak?", "What is the most widely spoken language in {c}?",
                 "Which language is mainly spoken in {c}?"],
}
ELEMENTS = [
    ("hydrogen", "H"), ("helium", "He"), ("lithium", "Li"), ("carbon", "C"), ("nitrogen", "N"), ("oxygen", "O"),
    ("fluorine", "F"), ("neon", "Ne"), ("sodium", "Na"), ("magnesium", "Mg"), ("aluminium", "Al"),
    ("silicon", "Si"), ("phosphorus", "P"), ("sulfur", "S"), ("chlorine", "Cl"), ("argon", "Ar"),
    ("potassium", "K"), ("calcium", "Ca"), ("iron", "Fe"), ("copper", "Cu"), ("zinc", "Zn"), ("silver", "Ag"),
    ("tin", "Sn"), ("gold", "Au"), ("mercury", "Hg"), ("lead", "Pb"), ("uranium", "U"), ("nickel", "Ni"),
    ("iodine", "I"), ("platinum", "Pt"), ("titanium", "Ti"), ("chromium", "Cr"), ("manganese", "Mn"),
    ("cobalt", "Co"), ("bromine", "Br"), ("krypton", "Kr"), ("tungsten", "W"), ("radon", "Rn"), ("boron", "B"),
    ("barium", "Ba"),
]
SYMBOL_QUESTIONS = ["What is the chemical symbol for {e}?", "What is the symbol of the element {e}?"]
ELEMENT_QUESTIONS = ["Which element has the chemical symbol {s}?", "Which chemical element is written {s}?"]
COUNTS = [
    ("How many days are in a week?", "7"), ("How many months are in a year?", "12"),
    ("How many hours are in a day?", "24"), ("How many minutes are in an hour?", "60"),
    ("How many seconds are in a minute?", "60"), ("How many legs does a spider have?", "8"),
    ("How many legs does an insect have?", "6"), ("How many sides does a triangle have?", "3"),
    ("How many sides does a hexagon have?", "6"), ("How many sides does an octagon have?", "8"),
    ("How many sides does a pentagon have?", "5"), ("How many days are in a leap year?", "366"),
    ("How many continents are there?", "7"), ("How many players does a football team have on the pitch?", "11"),
    ("How many weeks are in a year?", "52"), ("How many centimetres are in a metre?", "100"),
    ("How many grams are in a kilogram?", "1000"), ("How many planets are in the Solar System?", "8"),
    ("At how many degrees Celsius does water freeze?", "0"),
    ("At how many degrees Celsius does water boil at sea level?", "100"),
    ("How many strings does a standard guitar have?", "6"), ("How many keys does a standard piano have?", "88"),
    ("How many years are in a century?", "100"), ("How many days are in a fortnight?", "14"),
]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
ARITHMETIC = {"plus": ["What is {a} plus {b}?", "How much is {a} plus {b}?",
                       "What do you get when you add {a} and {b}?"],
              "minus": ["What is {a} minus {b}?", "How much is {a} minus {b}?", "What is {b} subtracted from {a}?"],
              "times": ["What is {a} times {b}?", "What is {a} multiplied by {b}?", "How much is {a} times {b}?"]}


def _qa_facts() -> dict[tuple, list[tuple[str, str]]]:
    """Fact key -> its (question, answer) phrasings; all phrasings of a fact share one side."""
    facts: dict[tuple, list[tuple[str, str]]] = {}
    for country, *values in COUNTRIES:
        for rel, value in zip(("capital", "currency", "continent", "language"), values):
            if value is not None:
                facts[(rel, country)] = [(q.format(c=country, C=_cap(country)), value) for q in COUNTRY_QUESTIONS[rel]]
    for name, sym in ELEMENTS:  # both directions of one element are one unit
        facts[("element", name)] = ([(q.format(e=name), sym) for q in SYMBOL_QUESTIONS]
                                    + [(q.format(s=sym), name) for q in ELEMENT_QUESTIONS])
    for q, a in COUNTS:
        facts[("count", q)] = [(q, a)]
    return facts


def _arithmetic(rng: random.Random, n: int, exclude: set[tuple]) -> list[tuple[tuple, str, str]]:
    out, keys = [], set()
    while len(out) < n:
        op = rng.choice(sorted(ARITHMETIC))
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        if op == "minus" and a < b:
            a, b = b, a
        key = ("arith", op, *(sorted((a, b)) if op != "minus" else (a, b)))
        if key in keys or key in exclude:
            continue
        keys.add(key)
        value = a + b if op == "plus" else a - b if op == "minus" else a * b
        say = (lambda x: NUMBER_WORDS[x]) if rng.random() < 0.3 else str
        out.append((key, rng.choice(ARITHMETIC[op]).format(a=say(a), b=say(b)), str(value)))
    return out


def question_answering(seed: int = 1235, n_train: int = 400, n_test: int = 100) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    facts = _qa_facts()
    keys = list(facts)
    rng.shuffle(keys)
    by_kind: dict[str, list[tuple]] = {}
    for k in keys:
        by_kind.setdefault(k[0], []).append(k)
    # Test facts: a spread over every kind of fact; elements count double (two questions each).
    quota = {"capital": 18, "currency": 14, "continent": 10, "language": 12, "element": 10, "count": 6}
    test_keys = [k for kind, q in quota.items() for k in by_kind[kind][:q]]
    test = []
    for k in test_keys:
        if k[0] == "element":
            test += [rng.choice(facts[k][:2]), rng.choice(facts[k][2:])]  # name -> symbol, symbol -> name
        else:
            test.append(rng.choice(facts[k]))
    arith = _arithmetic(rng, 200, set())
    test += [(q, a) for _, q, a in arith[: n_test - len(test)]]
    assert len(test) == n_test, len(test)
    held = set(test_keys)
    # Training: one phrasing of every other fact (an element: one question each way), 60
    # arithmetic questions, then second phrasings of country facts up to n_train.
    train: list[tuple[str, str]] = []
    extra: list[tuple[str, str]] = []
    for k in keys:
        if k in held:
            continue
        if k[0] == "element":
            train += [rng.choice(facts[k][:2]), rng.choice(facts[k][2:])]
        else:
            phrasings = rng.sample(facts[k], len(facts[k]))
            train.append(phrasings[0])
            extra += phrasings[1:2]
    arith_keys = {k for k, _, _ in arith}
    train += [(q, a) for _, q, a in _arithmetic(random.Random(seed + 1), 60, arith_keys)]
    assert len(train) <= n_train, len(train)
    train += extra[: n_train - len(train)]
    rng.shuffle(train)
    rng.shuffle(test)

    def row(qa: tuple[str, str]) -> dict:
        return {"messages": [{"role": "user", "content": qa[0]}, {"role": "assistant", "content": qa[1]}]}

    return [row(x) for x in train], [row(x) for x in test]


# --- code generation -----------------------------------------------------------------------------

NUM1 = [("n",), ("x",), ("num",), ("value",), ("k",), ("number",)]
NUM2 = [("a", "b"), ("x", "y"), ("m", "n"), ("p", "q"), ("first", "second"), ("left", "right")]
NUM3 = [("a", "b", "c"), ("x", "y", "z"), ("p", "q", "r")]
RANGE3 = [("x", "lo", "hi"), ("value", "low", "high"), ("n", "minimum", "maximum"), ("num", "start", "end")]
STR1 = [("s",), ("text",), ("word",), ("string",), ("phrase",)]
LIST1 = [("xs",), ("nums",), ("numbers",), ("values",), ("items",), ("lst",), ("data",)]
LIST_ITEM = [("xs", "target"), ("items", "x"), ("values", "item"), ("lst", "value"), ("nums", "n")]
WORDS = [("words",), ("parts",), ("tokens",), ("strings",)]


@dataclass
class Family:
    key: str
    names: list[str]
    params: list[tuple[str, ...]]
    descs: list[str]  # "{0}" etc. are the parameter names; each starts with a verb
    body: str  # lines, "{0}" etc. are the parameter names; indented by the generator
    cases: list[tuple[tuple, Any]]  # (arguments, expected); a bool expects truthiness


T, F = True, False
FAMILIES = [
    Family("is_even", ["is_even", "check_even", "even"], NUM1,
           ["returns True when {0} is even", "checks whether {0} is an even number"],
           "return {0} % 2 == 0", [((4,), T), ((7,), F), ((0,), T), ((-3,), F)]),
    Family("is_odd", ["is_odd", "check_odd", "odd"], NUM1,
           ["returns True when {0} is odd", "checks whether {0} is an odd number"],
           "return {0} % 2 == 1", [((3,), T), ((8,), F), ((-5,), T)]),
    Family("square", ["square", "squared", "sq"], NUM1,
           ["returns the square of {0}", "returns {0} multiplied by itself"],
           "return {0} * {0}", [((3,), 9), ((-4,), 16), ((0,), 0)]),
    Family("cube", ["cube", "cubed", "to_cube"], NUM1,
           ["returns the cube of {0}", "returns {0} raised to the third power"],
           "return {0} ** 3", [((2,), 8), ((-3,), -27), ((1,), 1)]),
    Family("double", ["double", "twice", "times_two"], NUM1,
           ["returns {0} doubled", "returns two times {0}"],
           "return 2 * {0}", [((5,), 10), ((-1,), -2), ((0,), 0)]),
    Family("negate", ["negate", "opposite", "flip_sign"], NUM1,
           ["returns {0} with its sign flipped", "returns the negative of {0}"],
           "return -{0}", [((5,), -5), ((-2,), 2), ((0,), 0)]),
    Family("absolute", ["absolute", "abs_value", "magnitude"], NUM1,
           ["returns the absolute value of {0}", "returns {0} without its sign"],
           "return -{0} if {0} < 0 else {0}", [((-7,), 7), ((3,), 3), ((0,), 0)]),
    Family("is_positive", ["is_positive", "positive", "check_positive"], NUM1,
           ["returns True when {0} is greater than zero", "checks whether {0} is positive"],
           "return {0} > 0", [((5,), T), ((0,), F), ((-2,), F)]),
    Family("is_negative", ["is_negative", "negative", "below_zero"], NUM1,
           ["returns True when {0} is less than zero", "checks whether {0} is negative"],
           "return {0} < 0", [((-5,), T), ((0,), F), ((2,), F)]),
    Family("sign", ["sign", "sign_of", "get_sign"], NUM1,
           ["returns 1 if {0} is positive, -1 if it is negative and 0 otherwise"],
           "if {0} > 0:\n    return 1\nif {0} < 0:\n    return -1\nreturn 0", [((9,), 1), ((-4,), -1), ((0,), 0)]),
    Family("factorial", ["factorial", "fact", "compute_factorial"], NUM1,
           ["returns the factorial of {0}", "returns the product of the integers from 1 to {0}"],
           "result = 1\nfor i in range(2, {0} + 1):\n    result *= i\nreturn result",
           [((0,), 1), ((1,), 1), ((5,), 120)]),
    Family("sum_to", ["sum_to", "sum_up_to", "triangular"], NUM1,
           ["returns the sum of the integers from 1 to {0}", "adds up all whole numbers from 1 to {0}"],
           "return {0} * ({0} + 1) // 2", [((1,), 1), ((4,), 10), ((10,), 55), ((0,), 0)]),
    Family("fibonacci", ["fibonacci", "fib", "nth_fibonacci"], NUM1,
           ["returns the Fibonacci number at position {0}, where the sequence starts 0, 1, 1, 2"],
           "a, b = 0, 1\nfor _ in range({0}):\n    a, b = b, a + b\nreturn a",
           [((0,), 0), ((1,), 1), ((7,), 13), ((10,), 55)]),
    Family("digit_sum", ["digit_sum", "sum_digits", "add_digits"], NUM1,
           ["returns the sum of the decimal digits of the non-negative integer {0}"],
           "return sum(int(d) for d in str({0}))", [((123,), 6), ((0,), 0), ((9045,), 18)]),
    Family("count_digits", ["count_digits", "num_digits", "digit_count"], NUM1,
           ["returns how many decimal digits the non-negative integer {0} has"],
           "return len(str({0}))", [((7,), 1), ((12345,), 5), ((100,), 3)]),
    Family("is_prime", ["is_prime", "prime", "check_prime"], NUM1,
           ["returns True when {0} is a prime number", "checks whether the integer {0} is prime"],
           "if {0} < 2:\n    return False\nfor i in range(2, int({0} ** 0.5) + 1):\n"
           "    if {0} % i == 0:\n        return False\nreturn True",
           [((2,), T), ((15,), F), ((13,), T), ((1,), F), ((97,), T)]),
    Family("is_leap_year", ["is_leap_year", "leap_year", "is_leap"], [("year",), ("y",), ("yr",)],
           ["returns True when {0} is a leap year in the Gregorian calendar"],
           "return {0} % 4 == 0 and ({0} % 100 != 0 or {0} % 400 == 0)",
           [((2024,), T), ((1900,), F), ((2000,), T), ((2023,), F)]),
    Family("c_to_f", ["celsius_to_fahrenheit", "c_to_f", "to_fahrenheit"],
           [("c",), ("celsius",), ("temp",), ("degrees",)],
           ["converts {0} degrees Celsius to Fahrenheit", "returns the Fahrenheit value of {0} degrees Celsius"],
           "return {0} * 9 / 5 + 32", [((0,), 32.0), ((100,), 212.0), ((-40,), -40.0)]),
    Family("f_to_c", ["fahrenheit_to_celsius", "f_to_c", "to_celsius"],
           [("f",), ("fahrenheit",), ("temp",), ("degrees",)],
           ["converts {0} degrees Fahrenheit to Celsius", "returns the Celsius value of {0} degrees Fahrenheit"],
           "return ({0} - 32) * 5 / 9", [((32,), 0.0), ((212,), 100.0), ((-40,), -40.0)]),
    Family("minutes_to_seconds", ["minutes_to_seconds", "to_seconds", "mins_to_secs"],
           [("minutes",), ("m",), ("mins",)], ["returns the number of seconds in {0} minutes"],
           "return {0} * 60", [((1,), 60), ((3,), 180), ((0,), 0)]),
    Family("hours_to_minutes", ["hours_to_minutes", "to_minutes", "hrs_to_mins"],
           [("hours",), ("h",), ("hrs",)], ["returns the number of minutes in {0} hours"],
           "return {0} * 60", [((2,), 120), ((1,), 60), ((0,), 0)]),
    Family("add", ["add", "add_numbers", "plus", "sum_two"], NUM2,
           ["returns the sum of {0} and {1}", "adds {0} and {1} and returns the result"],
           "return {0} + {1}", [((2, 3), 5), ((-1, 1), 0), ((10, -4), 6)]),
    Family("subtract", ["subtract", "minus", "difference"], NUM2,
           ["returns {0} minus {1}", "subtracts {1} from {0} and returns the result"],
           "return {0} - {1}", [((5, 3), 2), ((1, 4), -3), ((0, 0), 0)]),
    Family("multiply", ["multiply", "times", "product"], NUM2,
           ["returns the product of {0} and {1}", "multiplies {0} by {1} and returns the result"],
           "return {0} * {1}", [((3, 4), 12), ((-2, 5), -10), ((7, 0), 0)]),
    Family("power", ["power", "raise_to", "to_power"], NUM2,
           ["returns {0} raised to the power {1}"],
           "return {0} ** {1}", [((2, 10), 1024), ((3, 0), 1), ((5, 2), 25)]),
    Family("max2", ["max_of_two", "larger", "bigger"], NUM2,
           ["returns the larger of {0} and {1}", "returns whichever of {0} and {1} is greater"],
           "return {0} if {0} > {1} else {1}", [((3, 9), 9), ((7, 2), 7), ((-1, -5), -1)]),
    Family("min2", ["min_of_two", "smaller", "lesser"], NUM2,
           ["returns the smaller of {0} and {1}", "returns whichever of {0} and {1} is less"],
           "return {0} if {0} < {1} else {1}", [((3, 9), 3), ((7, 2), 2), ((-1, -5), -5)]),
    Family("is_divisible", ["is_divisible", "divides", "divisible_by"], NUM2,
           ["returns True when {0} is divisible by {1}", "checks whether {1} divides {0} exactly"],
           "return {0} % {1} == 0", [((10, 5), T), ((7, 2), F), ((0, 3), T)]),
    Family("gcd", ["gcd", "greatest_common_divisor", "hcf"], NUM2,
           ["returns the greatest common divisor of the positive integers {0} and {1}"],
           "while {1}:\n    {0}, {1} = {1}, {0} % {1}\nreturn {0}", [((12, 18), 6), ((7, 5), 1), ((20, 10), 10)]),
    Family("average2", ["average_of_two", "mean_of_two", "midpoint"], NUM2,
           ["returns the average of {0} and {1}", "returns the number halfway between {0} and {1}"],
           "return ({0} + {1}) / 2", [((2, 4), 3.0), ((1, 2), 1.5), ((-3, 3), 0.0)]),
    Family("rectangle_area", ["rectangle_area", "area", "area_of_rectangle"],
           [("width", "height"), ("w", "h"), ("length", "breadth"), ("a", "b")],
           ["returns the area of a rectangle with sides {0} and {1}"],
           "return {0} * {1}", [((3, 4), 12), ((5, 5), 25), ((0, 7), 0)]),
    Family("rectangle_perimeter", ["rectangle_perimeter", "perimeter", "perimeter_of_rectangle"],
           [("width", "height"), ("w", "h"), ("length", "breadth"), ("a", "b")],
           ["returns the perimeter of a rectangle with sides {0} and {1}"],
           "return 2 * ({0} + {1})", [((3, 4), 14), ((5, 5), 20), ((1, 0), 2)]),
    Family("remainder", ["remainder", "mod", "modulo"], NUM2,
           ["returns the remainder when {0} is divided by {1}"],
           "return {0} % {1}", [((10, 3), 1), ((8, 4), 0), ((7, 5), 2)]),
    Family("clamp", ["clamp", "limit", "bound"], RANGE3,
           ["returns {0} limited to the range from {1} to {2}", "clamps {0} so that it lies between {1} and {2}"],
           "return max({1}, min({0}, {2}))", [((5, 0, 10), 5), ((-3, 0, 10), 0), ((42, 0, 10), 10)]),
    Family("between", ["is_between", "in_range", "within"], RANGE3,
           ["returns True when {0} lies between {1} and {2} inclusive"],
           "return {1} <= {0} <= {2}", [((5, 0, 10), T), ((-3, 0, 10), F), ((10, 0, 10), T)]),
    Family("max3", ["max_of_three", "largest_of_three", "biggest_of_three"], NUM3,
           ["returns the largest of {0}, {1} and {2}"],
           "return max({0}, {1}, {2})", [((1, 5, 3), 5), ((9, 2, 4), 9), ((-1, -2, -3), -1)]),
    Family("min3", ["min_of_three", "smallest_of_three", "least_of_three"], NUM3,
           ["returns the smallest of {0}, {1} and {2}"],
           "return min({0}, {1}, {2})", [((1, 5, 3), 1), ((9, 2, 4), 2), ((-1, -2, -3), -3)]),
    Family("reverse_string", ["reverse_string", "reverse_text", "backwards"], STR1,
           ["returns {0} reversed", "returns the characters of {0} in reverse order"],
           "return {0}[::-1]", [(("abc",), "cba"), (("",), ""), (("racecar",), "racecar")]),
    Family("count_vowels", ["count_vowels", "vowel_count", "num_vowels"], STR1,
           ["returns how many vowels (a, e, i, o, u) the lowercase string {0} contains"],
           "return sum(1 for ch in {0} if ch in 'aeiou')", [(("hello",), 2), (("sky",), 0), (("banana",), 3)]),
    Family("is_palindrome", ["is_palindrome", "palindrome", "reads_same_backwards"], STR1,
           ["returns True when {0} reads the same forwards and backwards"],
           "return {0} == {0}[::-1]", [(("level",), T), (("hello",), F), (("",), T)]),
    Family("first_char", ["first_char", "first_letter", "initial"], STR1,
           ["returns the first character of the non-empty string {0}"],
           "return {0}[0]", [(("hello",), "h"), (("x",), "x"), (("Zoo",), "Z")]),
    Family("last_char", ["last_char", "last_letter", "final_char"], STR1,
           ["returns the last character of the non-empty string {0}"],
           "return {0}[-1]", [(("hello",), "o"), (("x",), "x"), (("Zoo",), "o")]),
    Family("word_count", ["word_count", "count_words", "num_words"], STR1,
           ["returns the number of words in {0}, where words are separated by whitespace"],
           "return len({0}.split())", [(("hello world",), 2), (("",), 0), (("  one  two three ",), 3)]),
    Family("upper", ["to_upper", "shout", "uppercase"], STR1,
           ["returns {0} in upper case", "returns a copy of {0} with every letter capitalised"],
           "return {0}.upper()", [(("hello",), "HELLO"), (("a1b",), "A1B"), (("",), "")]),
    Family("capitalize_first", ["capitalize_first", "cap_first", "upper_first"], STR1,
           ["returns {0} with its first character in upper case and the rest unchanged"],
           "return {0}[:1].upper() + {0}[1:]", [(("hello",), "Hello"), (("",), ""), (("hELLO",), "HELLO")]),
    Family("remove_spaces", ["remove_spaces", "strip_spaces", "no_spaces"], STR1,
           ["returns {0} with every space removed"],
           "return {0}.replace(' ', '')", [(("a b c",), "abc"), (("none",), "none"), ((" x ",), "x")]),
    Family("count_char", ["count_char", "char_count", "occurrences_of"],
           [("s", "c"), ("text", "ch"), ("word", "letter"), ("string", "char")],
           ["returns how many times the character {1} appears in {0}"],
           "return {0}.count({1})", [(("banana", "a"), 3), (("hello", "z"), 0), (("", "a"), 0)]),
    Family("repeat_string", ["repeat_string", "repeat", "repeat_text"],
           [("s", "n"), ("text", "times"), ("word", "count"), ("string", "k")],
           ["returns {0} repeated {1} times"],
           "return {0} * {1}", [(("ab", 3), "ababab"), (("x", 0), ""), (("hi", 1), "hi")]),
    Family("starts_with", ["starts_with", "has_prefix", "begins_with"],
           [("s", "prefix"), ("text", "start"), ("word", "beginning"), ("string", "head")],
           ["returns True when {0} starts with {1}"],
           "return {0}.startswith({1})", [(("hello", "he"), T), (("hello", "lo"), F), (("abc", ""), T)]),
    Family("ends_with", ["ends_with", "has_suffix", "finishes_with"],
           [("s", "suffix"), ("text", "end"), ("word", "ending"), ("string", "tail")],
           ["returns True when {0} ends with {1}"],
           "return {0}.endswith({1})", [(("hello", "lo"), T), (("hello", "he"), F), (("abc", ""), T)]),
    Family("join_words", ["join_words", "make_sentence", "join_with_spaces"], WORDS,
           ["returns the strings in the list {0} joined with single spaces"],
           "return ' '.join({0})", [((["a", "b"],), "a b"), (([],), ""), ((["hi"],), "hi")]),
    Family("longest_word", ["longest_word", "longest", "longest_string"], WORDS,
           ["returns the longest string in the non-empty list {0}, the first one if there is a tie"],
           "return max({0}, key=len)", [((["a", "abc", "ab"],), "abc"), ((["hi", "yo"],), "hi")]),
    Family("sum_list", ["sum_list", "list_sum", "add_all"], LIST1,
           ["returns the sum of the numbers in the list {0}", "adds up all the numbers in the list {0}"],
           "return sum({0})", [(([1, 2, 3],), 6), (([],), 0), (([-1, 1],), 0)]),
    Family("product_list", ["product_of_list", "multiply_all", "list_product"], LIST1,
           ["returns the product of the numbers in the list {0}, or 1 for an empty list"],
           "result = 1\nfor v in {0}:\n    result *= v\nreturn result", [(([2, 3, 4],), 24), (([],), 1), (([5],), 5)]),
    Family("list_max", ["list_max", "largest", "max_in_list"], LIST1,
           ["returns the largest number in the non-empty list {0}"],
           "return max({0})", [(([3, 9, 2],), 9), (([-5],), -5), (([-1, -7],), -1)]),
    Family("list_min", ["list_min", "smallest", "min_in_list"], LIST1,
           ["returns the smallest number in the non-empty list {0}"],
           "return min({0})", [(([3, 9, 2],), 2), (([-5],), -5), (([-1, -7],), -7)]),
    Family("average", ["average", "mean", "list_average"], LIST1,
           ["returns the average of the numbers in the non-empty list {0}"],
           "return sum({0}) / len({0})", [(([1, 2, 3],), 2.0), (([4],), 4.0), (([1, 2],), 1.5)]),
    Family("count_even", ["count_even", "count_evens", "num_even"], LIST1,
           ["returns how many even numbers the list {0} contains"],
           "return sum(1 for v in {0} if v % 2 == 0)", [(([1, 2, 4],), 2), (([],), 0), (([3, 5],), 0)]),
    Family("count_positive", ["count_positive", "num_positive", "positives_count"], LIST1,
           ["returns how many numbers in the list {0} are greater than zero"],
           "return sum(1 for v in {0} if v > 0)", [(([1, -2, 4],), 2), (([],), 0), (([0, -1],), 0)]),
    Family("count_occurrences", ["count_occurrences", "count_item", "frequency"], LIST_ITEM,
           ["returns how many times {1} appears in the list {0}"],
           "return {0}.count({1})", [(([1, 2, 1], 1), 2), (([], 3), 0), (([4, 5], 6), 0)]),
    Family("contains", ["contains", "includes", "has_item"], LIST_ITEM,
           ["returns True when {1} is in the list {0}"],
           "return {1} in {0}", [(([1, 2, 3], 2), T), (([], 1), F), (([4, 5], 6), F)]),
    Family("reverse_list", ["reverse_list", "reversed_list", "flip_list"], LIST1,
           ["returns a new list with the elements of {0} in reverse order"],
           "return {0}[::-1]", [(([1, 2, 3],), [3, 2, 1]), (([],), []), (([7],), [7])]),
    Family("first_element", ["first_element", "head", "first_item"], LIST1,
           ["returns the first element of the non-empty list {0}"],
           "return {0}[0]", [(([4, 5],), 4), (([9],), 9)]),
    Family("last_element", ["last_element", "last_item", "final_element"], LIST1,
           ["returns the last element of the non-empty list {0}"],
           "return {0}[-1]", [(([4, 5],), 5), (([9],), 9)]),
    Family("double_all", ["double_all", "doubled", "double_each"], LIST1,
           ["returns a new list with every number in {0} doubled"],
           "return [2 * v for v in {0}]", [(([1, 2],), [2, 4]), (([],), []), (([-3],), [-6])]),
    Family("square_all", ["square_all", "squares", "square_each"], LIST1,
           ["returns a new list with the square of every number in {0}"],
           "return [v * v for v in {0}]", [(([1, 2, 3],), [1, 4, 9]), (([],), []), (([-3],), [9])]),
    Family("keep_even", ["keep_even", "filter_even", "evens"], LIST1,
           ["returns a list of the even numbers in {0}, in their original order"],
           "return [v for v in {0} if v % 2 == 0]", [(([1, 2, 3, 4],), [2, 4]), (([],), []), (([5],), [])]),
    Family("keep_positive", ["keep_positive", "filter_positive", "positives"], LIST1,
           ["returns a list of the numbers in {0} that are greater than zero, in order"],
           "return [v for v in {0} if v > 0]", [(([1, -2, 3],), [1, 3]), (([],), []), (([0],), [])]),
    Family("remove_duplicates", ["remove_duplicates", "dedupe", "unique"], LIST1,
           ["returns the elements of {0} without duplicates, keeping the first occurrence of each in order"],
           "result = []\nfor v in {0}:\n    if v not in result:\n        result.append(v)\nreturn result",
           [(([1, 2, 1, 3],), [1, 2, 3]), (([],), []), (([5, 5],), [5])]),
    Family("sort_list", ["sort_list", "sorted_copy", "ascending"], LIST1,
           ["returns a new list with the numbers of {0} sorted from smallest to largest"],
           "return sorted({0})", [(([3, 1, 2],), [1, 2, 3]), (([],), []), (([-1, -5],), [-5, -1])]),
    Family("is_sorted", ["is_sorted", "in_order", "is_ascending"], LIST1,
           ["returns True when the list {0} is in non-decreasing order"],
           "return all({0}[i] <= {0}[i + 1] for i in range(len({0}) - 1))",
           [(([1, 2, 2, 5],), T), (([3, 1],), F), (([],), T)]),
    Family("is_empty", ["is_empty", "empty", "has_no_items"], LIST1,
           ["returns True when the list {0} has no elements"],
           "return len({0}) == 0", [(([],), T), (([0],), F)]),
    Family("value_range", ["value_range", "spread", "max_minus_min"], LIST1,
           ["returns the difference between the largest and the smallest number in the non-empty list {0}"],
           "return max({0}) - min({0})", [(([3, 9, 2],), 7), (([5],), 0), (([-1, 1],), 2)]),
    Family("sum_of_squares", ["sum_of_squares", "sum_squares", "square_sum"], LIST1,
           ["returns the sum of the squares of the numbers in {0}"],
           "return sum(v * v for v in {0})", [(([1, 2, 3],), 14), (([],), 0), (([-2],), 4)]),
    Family("has_duplicates", ["has_duplicates", "contains_duplicates", "any_repeats"], LIST1,
           ["returns True when some value appears more than once in the list {0}"],
           "return len(set({0})) != len({0})", [(([1, 2, 1],), T), (([1, 2, 3],), F), (([],), F)]),
]
CODE_PROMPTS = ["# Write a function {sig} that {desc}.\n", "# Write a Python function {sig} that {desc}.\n",
                "# Implement {sig}, which {desc}.\n"]


def _code_record(fam: Family, name: str, params: tuple[str, ...], rng: random.Random) -> dict:
    sig = f"{name}({', '.join(params)})"
    desc = rng.choice(fam.descs).format(*params)
    prompt = rng.choice(CODE_PROMPTS).format(sig=sig, desc=desc)
    body = "".join("    " + line + "\n" for line in fam.body.format(*params).split("\n"))
    tests = ""
    for args, expected in fam.cases:
        call = f"{name}({', '.join(repr(a) for a in args)})"
        if expected is True:
            tests += f"assert {call}\n"
        elif expected is False:
            tests += f"assert not {call}\n"
        else:
            tests += f"assert {call} == {expected!r}\n"
    return {"prompt": prompt, "completion": f"def {sig}:\n{body}", "tests": "\n" + tests}


def code_generation(seed: int = 1236, n_train: int = 400, n_test: int = 100) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    units: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    for fam in FAMILIES:
        combos = [(n, p) for n in fam.names for p in fam.params]
        rng.shuffle(combos)
        units[fam.key] = combos
    # Test: held-out (name, parameters) units spread over the families, at most two per family;
    # every family keeps other units for training.
    fams = list(FAMILIES)
    rng.shuffle(fams)
    test_units: list[tuple[Family, str, tuple]] = []
    for round_ in range(2):
        for fam in fams:
            if len(test_units) < n_test and len(units[fam.key]) > 4:
                test_units.append((fam, *units[fam.key][round_]))
    held = {(f.key, n, p) for f, n, p in test_units}
    train_units = [(fam, n, p) for fam in FAMILIES for n, p in units[fam.key] if (fam.key, n, p) not in held]
    rng.shuffle(train_units)
    # Spread training over families: round-robin over their units until n_train.
    by_fam: dict[str, list] = {}
    for u in train_units:
        by_fam.setdefault(u[0].key, []).append(u)
    chosen: list = []
    while len(chosen) < n_train:
        for key in sorted(by_fam):
            if by_fam[key] and len(chosen) < n_train:
                chosen.append(by_fam[key].pop())
    train = [_code_record(f, n, p, rng) for f, n, p in chosen]
    test = [_code_record(f, n, p, rng) for f, n, p in test_units]
    rng.shuffle(train)
    rng.shuffle(test)
    assert {f.key for f, _, _ in test_units} <= {f.key for f, _, _ in chosen}
    return train, test


def run_code_record(record: dict) -> None:
    """Run prompt + completion + tests in a fresh namespace (our own code); raise if a test fails."""
    source = record["prompt"] + record["completion"] + record["tests"]
    exec(compile(source, "<record>", "exec"), {"__name__": "__record__"})  # noqa: S102 - our own code


# --- checks and output ---------------------------------------------------------------------------

def normalized_key(record: dict) -> str:
    """What the record trains on, as JSON with every string's whitespace collapsed (the
    identity kubeforge_runtime.data.normalized_key gives it; the "tests" key is not content)."""
    def norm(v: Any) -> Any:
        if isinstance(v, str):
            return " ".join(v.split())
        if isinstance(v, list):
            return [norm(x) for x in v]
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        return v
    content = {k: record[k] for k in ("messages", "prompt", "completion", "text") if k in record}
    return json.dumps(norm(content), sort_keys=True, ensure_ascii=False)


def prompt_of(record: dict) -> str:
    if "messages" in record:
        return " ".join(" ".join(m["content"].split()) for m in record["messages"] if m["role"] != "assistant")
    return " ".join(record["prompt"].split())


def check_split(name: str, train: list[dict], test: list[dict]) -> None:
    for rows, which in ((train, "train"), (test, "test")):
        keys = [normalized_key(r) for r in rows]
        assert len(set(keys)) == len(keys), f"{name} {which}: duplicate records"
    assert not {normalized_key(r) for r in train} & {normalized_key(r) for r in test}, f"{name}: train/test overlap"
    assert not {prompt_of(r) for r in train} & {prompt_of(r) for r in test}, f"{name}: a test prompt is in training"


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    sets = {
        "text-classification": classification(),
        "question-answering": question_answering(),
        "code-generation": code_generation(),
    }
    for name, (train, test) in sets.items():
        check_split(name, train, test)
        if name == "code-generation":
            for r in train + test:
                run_code_record(r)
        write(OUT / f"{name}.jsonl", train)
        write(OUT / f"{name}-test.jsonl", test)
        print(f"{name}: {len(train)} train, {len(test)} test")


if __name__ == "__main__":
    main()
