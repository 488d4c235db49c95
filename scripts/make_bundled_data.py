"""Write loralib's bundled mini datasets: synthetic GLUE and SQuAD stand-ins in the hub's exact schema.

Every sentence is made up here from small templates and word lists (nothing is copied from the real
datasets). The rows follow the hub's columns and label conventions (`loralib.data.GLUE_TASKS` /
`SQUAD_TASKS`), and most tasks carry a simple learnable signal (sentiment words for sst2, the
referent's size for wnli, ...), so a smoke run can show a loss going down. They are for offline
smoke tests only: no number measured on them means anything about a model.

Deterministic: the same code writes byte-identical files (tests/test_04_data.py checks that the
shipped files are exactly what this script writes).

    python scripts/make_bundled_data.py            # rewrite loralib/resources/{glue,squad}
    python scripts/make_bundled_data.py --out DIR  # write elsewhere

Not here: loading (`loralib.data.load_glue` / `load_squad` with data_dir="bundled").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

GLUE_SIZES = {"train": 48, "eval": 24}
SQUAD_SIZES = {"train": 40, "validation": 20}
# The tasks the toy profile learns on (notebooks 04 and 05): enough rows for a pretrained model to show
# a learning curve in a CPU minute, and for an accuracy or EM to move in steps of 1-2 points.
LEARNING_SIZES = {
    "sst2": {"train": 400, "eval": 100},
    "squad": {"train": 300, "validation": 60},
    "squad_v2": {"train": 300, "validation": 60},
}

NAMES = ["Mira", "Tomas", "Ilse", "Oren", "Kade", "Lena", "Pavel", "Rhea", "Soren", "Nadia", "Ivo", "Greta"]
THINGS = ["letter", "basket", "lamp", "map", "boat", "drum", "kettle", "ladder", "coat", "bicycle"]
PLACES = ["market", "station", "library", "harbour", "bakery", "school", "gallery", "museum"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
# (past, base, third person) of transitive verbs.
VERBS = [
    ("painted", "paint", "paints"),
    ("repaired", "repair", "repairs"),
    ("carried", "carry", "carries"),
    ("sold", "sell", "sells"),
    ("found", "find", "finds"),
    ("cleaned", "clean", "cleans"),
    ("bought", "buy", "buys"),
    ("borrowed", "borrow", "borrows"),
]


def _pick(rng: random.Random, items: list, k: int = 1):
    return rng.sample(items, k) if k > 1 else rng.choice(items)


def _balanced(
    rng: random.Random, n: int, makers: list[Callable[[random.Random], dict]], seen: set[str]
) -> list[dict]:
    """n rows, cycling over one maker per label, shuffled; no text repeats within or across splits.

    `seen` holds the texts of the splits made before (train first), so evaluation rows never
    duplicate training rows; it is updated in place.
    """
    rows, i, tries = [], 0, 0
    while len(rows) < n:
        tries += 1
        if tries > 100 * n:
            raise RuntimeError(
                f"maker {i % len(makers)} cannot produce {n} distinct rows; add templates or words"
            )
        row = makers[i % len(makers)](rng)
        key = json.dumps({k: v for k, v in row.items() if k != "label"}, sort_keys=True)
        if key not in seen:
            seen.add(key)
            rows.append(row)
            i += 1
    rng.shuffle(rows)
    return rows


# ---------------------------------------------------------------- GLUE tasks


def cola(rng: random.Random, split: str, seen: set[str]) -> list[dict]:
    def good(r):
        name, thing, place = _pick(r, NAMES), _pick(r, THINGS), _pick(r, PLACES)
        past, base, third = _pick(r, VERBS)
        return {
            "sentence": r.choice(
                [
                    f"{name} {past} the {thing} at the {place}.",
                    f"The children {base} an old {thing} every {_pick(r, DAYS)}.",
                    f"{name} {third} the {thing} that {_pick(r, NAMES)} left behind.",
                    f"Which {thing} did {name} {base}?",
                    f"The {thing} was {past} by {name}.",
                ]
            ),
            "label": 1,
        }

    def bad(r):
        name, thing, place = _pick(r, NAMES), _pick(r, THINGS), _pick(r, PLACES)
        past, base, third = _pick(r, VERBS)
        return {
            "sentence": r.choice(
                [
                    f"{name} the {thing} {past} at the {place}.",
                    f"The children {third} an old {thing} every {_pick(r, DAYS)}.",
                    f"{name} {base} the the {thing}.",
                    f"Which {thing} did {name} {past}?",
                    f"The {thing} was {base} by {name} {thing}.",
                ]
            ),
            "label": 0,
        }

    return _balanced(rng, GLUE_SIZES[split], [good, bad], seen)


POSITIVE = ["wonderful", "moving", "charming", "brilliant", "delightful", "warm", "clever", "gripping"]
NEGATIVE = ["dull", "tedious", "clumsy", "boring", "lifeless", "awful", "flat", "forgettable"]
FILM = ["film", "movie", "story", "script", "performance", "soundtrack"]


def sst2(rng: random.Random, split: str, seen: set[str]) -> list[dict]:
    """Sentiment that counting words cannot read. Three rows in ten contrast two clauses, and the label
    follows the one that counts (after "but" / "yet", the main clause after "although"); three in ten
    negate a word ("not dull" is positive); four in ten are plain (one or two words of the label's
    polarity). Counting positive against negative words scores 0.51 / 0.52 (train / validation); the toy
    profile's MiniLM stays near 0.5 through its first epoch and reaches 0.92-1.00 after three (seeds 0-3)."""

    def contrast(r, label):  # the second clause decides
        first, second = _pick(r, NEGATIVE if label else POSITIVE), _pick(r, POSITIVE if label else NEGATIVE)
        n1, n2 = _pick(r, FILM, 2)
        return r.choice(
            [
                f"the {n1} is {first} , but the {n2} is {second} . ",
                f"{first} at first , yet {second} by the end . ",
                f"although the {n1} is {first} , the {n2} is {second} . ",
                f"a {first} {n1} , but a {second} {n2} . ",
            ]
        )

    def negated(r, label):  # "not w" has the opposite label of w
        word, noun = _pick(r, NEGATIVE if label else POSITIVE), _pick(r, FILM)
        return r.choice(
            [
                f"the {noun} is not {word} . ",
                f"it 's never {word} , not for a minute . ",
                f"hardly a {word} {noun} . ",
                f"the {noun} is not {word} at all . ",
                f"i would not call the {noun} {word} . ",
                f"not once is the {noun} {word} . ",
            ]
        )

    def plain(r, label):
        words = POSITIVE if label else NEGATIVE
        a, b = _pick(r, words, 2)
        noun = _pick(r, FILM)
        return r.choice([f"a {a} and {b} {noun} ", f"the {noun} is {a} from start to finish . ", f"{a} "])

    def make(label):
        def row(r):
            kind = r.choices([contrast, negated, plain], weights=[3, 3, 4])[0]
            return {"sentence": kind(r, label), "label": label}

        return row

    return _balanced(rng, LEARNING_SIZES["sst2"][split], [make(0), make(1)], seen)


def sst2_words(rng: random.Random, split: str, seen: set[str]) -> list[dict]:
    """The easier SST-2 variant (`data_dir="bundled-words"`): every sentiment word in a row has the
    label's polarity, so one word decides it. For many short runs that must learn in 32 steps (notebook 08
    compares dozens of them; notebook 07 uses `sst2_noisy` below); `sst2` above is the one a learning
    curve needs."""

    def make(words, label):
        def row(r):
            a, b = _pick(r, words, 2)
            noun = _pick(r, FILM)
            text = r.choice(
                [
                    f"a {a} and {b} {noun} ",
                    f"the {noun} is {a} from start to finish . ",
                    f"it 's {a} , {b} and utterly {_pick(r, words)} . ",
                    f"{a} ",
                    f"an often {a} {noun} with a {b} ending . ",
                ]
            )
            return {"sentence": text, "label": label}

        return row

    return _balanced(rng, LEARNING_SIZES["sst2"][split], [make(NEGATIVE, 0), make(POSITIVE, 1)], seen)


NOISY_SHARE = 0.15


def sst2_noisy(rng: random.Random, split: str, seen: set[str]) -> list[dict]:
    """`sst2_words` with 15% of the training labels flipped (`data_dir="bundled-noisy"`; validation clean).
    Real labels disagree too; here it gives the validation loss a floor above zero, so that a learning rate
    is tuned against something (on the clean twin a tuned run drives the loss to ~1e-4 and every choice
    looks the same). Notebook 07's runs use it."""
    rows = sst2_words(rng, split, seen)
    if split == "train":
        flip = set(
            random.Random("sst2/noisy-labels").sample(range(len(rows)), round(NOISY_SHARE * len(rows)))
        )
        rows = [{**row, "label": 1 - row["label"]} if i in flip else row for i, row in enumerate(rows)]
    return rows


COMPANIES = ["Norvale", "Brightwick", "Halden Foods", "Corrigan Steel", "Lumora", "Westfield Rail"]
CITIES = ["Arden", "Belmoor", "Calder", "Dunmere", "Elswick", "Farrow", "Galloway", "Hexley"]


def mrpc(rng: random.Random, split: str, seen: set[str]) -> list[dict]:
    def facts(r):
        return _pick(r, COMPANIES), _pick(r, NAMES), _pick(r, CITIES), r.randint(2, 90) * 10

    def equivalent(r):
        co, who, city, n = facts(r)
        s1 = f"{co} said on {_pick(r, DAYS)} that it would open a new office in {city} with {n} staff."
        s2 = r.choice(
            [
                f"A new {co} office with {n} employees will open in {city}, the company said.",
                f"{co} plans to open an office in {city} that will employ {n} people.",
                f"The company {co} announced a new {city} office staffed by {n} workers.",
            ]
        )
        if r.random() < 0.5:
            s1 = f"{who}, a spokesperson, said {co} had bought {n} trucks from a supplier in {city}."
            s2 = f"{co} purchased {n} trucks from a supplier in {city}, according to spokesperson {who}."
        return {"sentence1": s1, "sentence2": s2, "label": 1}

    def not_equivalent(r):
        co, who, city, n = facts(r)
        other_city = _pick(r, [c for c in CITIES if c != city])
        s1 = f"{co} said on {_pick(r, DAYS)} that it would open a new office in {city} with {n} staff."
        s2 = r.choice(
            [
                f"A new {co} office with {n} employees will open in {other_city}, the company said.",
                f"{co} plans to close its office in {city}, which employs {n} people.",
                f"{co} said profits in {city} fell by {n // 10} percent last year.",
            ]
        )
        return {"sentence1": s1, "sentence2": s2, "label": 0}

    return _balanced(rng, GLUE_SIZES[split], [equivalent, not_equivalent], seen)


def stsb(rng: random.Random, split: str, seen: set[str]) -> list[dict]:
    def row(r):
        name, thing, place = _pick(r, NAMES), _pick(r, THINGS), _pick(r, PLACES)
        past, _, _ = _pick(r, VERBS)
        day = _pick(r, DAYS)
        s1 = f"{name} {past} a {thing} at the {place} on {day}."
        # Change 0..4 of the four content slots; similarity falls with each change.
        changes = r.randint(0, 4)
        slots = r.sample(["name", "thing", "place", "day"], changes)
        n2 = _pick(r, [x for x in NAMES if x != name]) if "name" in slots else name
        t2 = _pick(r, [x for x in THINGS if x != thing]) if "thing" in slots else thing
        p2 = _pick(r, [x for x in PLACES if x != place]) if "place" in slots else place
        d2 = _pick(r, [x for x in DAYS if x != day]) if "day" in slots else day
        s2 = r.choice(
            [
                f"On {d2}, {n2} {past} a {t2} at the {p2}.",
                f"A {t2} was {past} by {n2} at the {p2} on {d2}.",
            ]
        )
        score = max(0.0, min(5.0, 5.0 - 1.2 * changes + r.choice([-0.2, 0.0, 0.2])))
        return {"sentence1": s1, "sentence2": s2, "label": round(score, 1)}

    return _balanced(rng, GLUE_SIZES[split], [row], seen)


SKILLS = [
    "play the guitar",
    "bake bread",
    "learn French",
    "write a novel",
    "start running",
    "grow tomatoes",
    "fix a bicycle",
    "paint with watercolours",
    "speak in public",
    "save money",
]


def qqp(rng: random.Random, split: str, seen: set[str]) -> list[dict]:
    def duplicate(r):
        skill = _pick(r, SKILLS)
        q1 = r.choice([f"How do I {skill}?", f"What is the best way to {skill}?"])
        q2 = r.choice(
            [f"How can I {skill} as a beginner?", f"What are good tips to {skill}?", f"How should I {skill}?"]
        )
        return {"question1": q1, "question2": q2, "label": 1}

    def not_duplicate(r):
        s1, s2 = _pick(r, SKILLS, 2)
        q1 = r.choice([f"How do I {s1}?", f"What is the best way to {s1}?"])
        q2 = r.choice([f"How can I {s2} as a beginner?", f"Why is it hard to {s1} after 40?"])
        return {"question1": q1, "question2": q2, "label": 0}

    return _balanced(rng, GLUE_SIZES[split], [duplicate, not_duplicate], seen)


def mnli(rng: random.Random, split: str, seen: set[str]) -> list[dict]:
    # Matched: everyday events (the train genre); mismatched: committee reports (a new genre).
    report = split == "validation_mismatched"

    def premise(r):
        """(who, what, where, sentence)."""
        if report:
            body, item = r.choice(["committee", "council", "board"]), r.choice(["budget", "plan", "proposal"])
            month = r.choice(["March", "June", "October"])
            return body, item, month, f"The {body} approved the {item} in {month} after a long debate."
        name, thing, place = _pick(r, NAMES), _pick(r, THINGS), _pick(r, PLACES)
        past = _pick(r, VERBS)[0]
        return name, thing, place, f"{name} {past} the {thing} at the {place} on {_pick(r, DAYS)}."

    def entailment(r):
        who, what, where, p = premise(r)
        h = f"The {who} approved something in {where}." if report else f"{who} was at the {where}."
        return {"premise": p, "hypothesis": h, "label": 0}

    def neutral(r):
        who, what, where, p = premise(r)
        h = f"The {who} was divided about the {what}." if report else f"{who} was happy with the {what}."
        return {"premise": p, "hypothesis": h, "label": 1}

    def contradiction(r):
        who, what, where, p = premise(r)
        h = f"The {who} rejected the {what}." if report else f"{who} never touched the {what}."
        return {"premise": p, "hypothesis": h, "label": 2}

    return _balanced(
        rng, GLUE_SIZES["train" if split == "train" else "eval"], [entailment, neutral, contradiction], seen
    )


def qnli(rng: random.Random, split: str, seen: set[str]) -> list[dict]:
    def entailment(r):
        name, thing, place = _pick(r, NAMES), _pick(r, THINGS), _pick(r, PLACES)
        past, base, _ = _pick(r, VERBS)
        q, s = r.choice(
            [
                (f"Where did {name} {base} the {thing}?", f"{name} {past} the {thing} at the {place}."),
                (f"When did {name} {base} the {thing}?", f"On {_pick(r, DAYS)}, {name} {past} the {thing}."),
                (f"Who {past} the {thing}?", f"The {thing} was {past} by {name} last week."),
            ]
        )
        return {"question": q, "sentence": s, "label": 0}

    def not_entailment(r):
        name, thing, place = _pick(r, NAMES), _pick(r, THINGS), _pick(r, PLACES)
        past, base, _ = _pick(r, VERBS)
        q, s = r.choice(
            [
                (f"Where did {name} {base} the {thing}?", f"{name} said the {thing} was very old."),
                (f"When did {name} {base} the {thing}?", f"The {place} is next to a small park."),
                (f"Who {past} the {thing}?", f"Nobody knows how much the {thing} cost."),
            ]
        )
        return {"question": q, "sentence": s, "label": 1}

    return _balanced(rng, GLUE_SIZES[split], [entailment, not_entailment], seen)


def rte(rng: random.Random, split: str, seen: set[str]) -> list[dict]:
    def story(r):
        co, city, who = _pick(r, COMPANIES), _pick(r, CITIES), _pick(r, NAMES)
        year = r.randint(1950, 2020)
        s1 = (
            f"{co}, which was founded in {city} in {year}, is now run by {who}. "
            f"The company employs about {r.randint(2, 40) * 50} people."
        )
        return co, city, who, year, s1

    def entailment(r):
        co, city, who, year, s1 = story(r)
        s2 = r.choice(
            [f"{co} was founded in {city}.", f"{who} runs {co}.", f"{co} has existed since {year}."]
        )
        return {"sentence1": s1, "sentence2": s2, "label": 0}

    def not_entailment(r):
        co, city, who, year, s1 = story(r)
        other = _pick(r, [c for c in CITIES if c != city])
        s2 = r.choice([f"{co} was founded in {other}.", f"{who} founded {co}.", f"{co} closed in {year}."])
        return {"sentence1": s1, "sentence2": s2, "label": 1}

    return _balanced(rng, GLUE_SIZES[split], [entailment, not_entailment], seen)


# (big thing, small container): "X did not fit into Y because it was too <adjective>"; a "big" adjective
# refers to X, a "small" one to Y.
FITS = [
    ("trophy", "suitcase"),
    ("piano", "van"),
    ("table", "doorway"),
    ("statue", "box"),
    ("sofa", "lift"),
    ("painting", "frame"),
    ("tent", "bag"),
    ("cake", "tin"),
]
BIG, SMALL = ["big", "large", "wide", "long"], ["small", "narrow", "short", "tiny"]


def wnli(rng: random.Random, split: str, seen: set[str]) -> list[dict]:
    def row(r, entails: bool):
        big, small = r.choice(FITS)
        size = r.choice(BIG + SMALL)
        s1 = f"The {big} did not fit into the {small} because it was too {size}."
        referent, wrong = (big, small) if size in BIG else (small, big)
        s2 = f"The {referent if entails else wrong} was too {size}."
        return {"sentence1": s1, "sentence2": s2, "label": int(entails)}  # 1 = entailment on the hub

    def helped(r, entails: bool):
        a, b = _pick(r, NAMES, 2)
        # "she" is the one who helped: the one being thanked.
        s1 = f"{a} thanked {b} because she had helped with the move."
        s2 = f"{b if entails else a} had helped with the move."
        return {"sentence1": s1, "sentence2": s2, "label": int(entails)}

    return _balanced(
        rng,
        GLUE_SIZES[split],
        [
            lambda r: row(r, True),
            lambda r: row(r, False),
            lambda r: helped(r, True),
            lambda r: helped(r, False),
        ],
        seen,
    )


GLUE_MAKERS = {
    "cola": cola,
    "sst2": sst2,
    "mrpc": mrpc,
    "stsb": stsb,
    "qqp": qqp,
    "mnli": mnli,
    "qnli": qnli,
    "rte": rte,
    "wnli": wnli,
}


# Variants of a task, written under <variant>/glue/<task>/ and loaded with data_dir="bundled-<variant>".
GLUE_VARIANTS = {"words": {"sst2": sst2_words}, "noisy": {"sst2": sst2_noisy}}


def glue_rows(task: str, variant: str | None = None) -> dict[str, list[dict]]:
    """{split: rows} for one GLUE task (or its `variant`), columns in the hub's order, idx = row number."""
    splits = (
        ["train", "validation_matched", "validation_mismatched"]
        if task == "mnli"
        else ["train", "validation"]
    )
    maker = GLUE_VARIANTS[variant][task] if variant else GLUE_MAKERS[task]
    out, seen = {}, set()
    for split in splits:  # train first: evaluation rows then avoid its texts
        rng = random.Random(f"{task}/{split}")  # a variant draws from the same seeds
        size_key = "train" if split == "train" else "eval"
        raw = maker(rng, split if task == "mnli" else size_key, seen)
        out[split] = [{**row, "idx": i} for i, row in enumerate(raw)]
    return out


# ---------------------------------------------------------------- SQuAD

TOWNS = [
    "Varnholm",
    "Estrella Bay",
    "Kettleby",
    "Oskarfjord",
    "Lindqvist Ford",
    "Marrowdale",
    "Pellham Cross",
]
RIVERS = ["Sel", "Amber", "Dorrow", "Wend", "Ilk", "Moss"]
PRODUCTS = ["blue pottery", "smoked herring", "woollen blankets", "copper bells", "apple cider", "rope"]
MATERIALS = ["grey limestone", "red brick", "oak timber", "black basalt"]
BUILDINGS = ["chapel", "customs house", "grain store", "watchtower"]
PROFESSIONS = ["weaver", "ferryman", "blacksmith", "shipwright", "miller"]
FILLER = [
    "Visitors often walk along the old walls in the evening, when the light turns the water gold.",
    "Most of the streets are narrow and paved with uneven stones that date from several centuries.",
    "The local school teaches children from the surrounding farms as well as from the town itself.",
    "In winter the harbour is quiet, and many of the shops close until the first warm weeks of spring.",
    "A small museum near the square keeps tools, letters and photographs donated by old families.",
    "Storms from the west sometimes flood the lower streets, so many houses are built on raised floors.",
    "The surrounding hills are covered with heather, and sheep graze on them for most of the year.",
    "Every summer a fair brings musicians, traders and travelling players from the neighbouring valleys.",
    "Fishing boats leave before dawn and usually return in the early afternoon with their catch.",
    "An old footpath follows the coast northwards and passes several ruined farmhouses on the way.",
]


def _town_facts(rng: random.Random, town: str) -> list[dict]:
    """Fact sentences about a made-up town, each with questions whose answers are substrings of it."""
    river, product = rng.choice(RIVERS), rng.choice(PRODUCTS)
    founder = f"{rng.choice(NAMES)} {rng.choice(['Aldane', 'Brisk', 'Corvel', 'Dunmore', 'Everly'])}"
    prof, year = rng.choice(PROFESSIONS), rng.randint(1100, 1850)
    day, building, material = rng.choice(DAYS), rng.choice(BUILDINGS), rng.choice(MATERIALS)
    houses, pop = rng.randint(12, 95), rng.choice([n * 100 for n in range(12, 91) if n != 20])
    rail_year, rail_city = rng.randint(1860, 1930), rng.choice(CITIES)
    mayor, mayor_year = (
        f"{rng.choice(NAMES)} {rng.choice(['Holt', 'Marsh', 'Quill', 'Renner'])}",
        rng.randint(1990, 2020),
    )
    # Each fact: (sentence, [(question, answer, extra gold answers)], [unanswerable questions]).
    return [
        {
            "text": f"{town} lies on the eastern bank of the river {river}, a short distance from the sea.",
            "qa": [(f"Which river flows past {town}?", river, [f"the river {river}"])],
            "impossible": [f"How long is the river {river}?"],
        },
        {
            "text": f"It was founded in {year} by {founder}, a {prof} who had moved there from {rail_city}.",
            "qa": [
                (f"When was {town} founded?", str(year), [f"in {year}"]),
                (f"Who founded {town}?", founder, [f"{founder}, a {prof}"]),
                (f"What was the profession of {town}'s founder?", prof, [f"a {prof}"]),
            ],
            "impossible": [f"When did {founder} die?", f"Who founded the neighbouring town of {rail_city}?"],
        },
        {
            "text": f"The town is known for its {product}, which is sold at a market held every {day}.",
            "qa": [
                (f"What is {town} known for?", product, [f"its {product}"]),
                (f"On which day is the market in {town} held?", day, [f"every {day}"]),
            ],
            "impossible": [f"How much does the {product} of {town} cost?"],
        },
        {
            "text": f"The {building}, built of {material}, is the oldest building that still stands in {town}.",
            "qa": [
                (f"What is the oldest building in {town}?", f"The {building}", [building]),
                (f"What material was the oldest building in {town} built of?", material, [material]),
            ],
            "impossible": [f"Who designed the {building} in {town}?"],
        },
        {
            "text": f"A storm in {year + 130} destroyed {houses} houses near the harbour, and many families left.",
            "qa": [
                (f"How many houses did the storm of {year + 130} destroy?", str(houses), [f"{houses} houses"])
            ],
            "impossible": [f"How many people died in the storm of {year + 130}?"],
        },
        {
            "text": f"A railway line to {rail_city} opened in {rail_year} and brought the first tourists.",
            "qa": [
                (f"When did the railway to {rail_city} open?", str(rail_year), [f"in {rail_year}"]),
                (f"Where does the railway from {town} lead?", rail_city, [f"to {rail_city}"]),
            ],
            "impossible": [f"When did the railway to {rail_city} close?"],
        },
        {
            "text": f"About {pop} people lived in {town} at the last census, and {mayor} has been mayor since {mayor_year}.",
            "qa": [
                (f"How many people lived in {town} at the last census?", f"About {pop}", [str(pop)]),
                (f"Who is the mayor of {town}?", mayor, [mayor]),
                (f"Since when has {mayor} been mayor?", str(mayor_year), [f"since {mayor_year}"]),
            ],
            "impossible": [f"Who was mayor of {town} before {mayor}?"],
        },
    ]


def _qid(task: str, split: str, n: int) -> str:
    return hashlib.sha1(f"loralib/{task}/{split}/{n}".encode()).hexdigest()[:24]


def _context(rng: random.Random, town: str, long: bool) -> tuple[str, list[tuple[str, int, list]], list[str]]:
    """A paragraph and its (question, answer_start, gold answers) plus unanswerable questions.

    Long paragraphs put filler between the facts so that they need several 384-token windows of the
    tiny tokenizer, with answers in the later windows too.
    """
    facts = _town_facts(rng, town)
    chosen = facts if long else rng.sample(facts, 3)
    filler = rng.sample(FILLER, len(FILLER))
    parts: list[str] = []
    answered: list[tuple[str, int, list]] = []
    impossible: list[str] = []
    gaps = len(chosen) - 1
    for k, fact in enumerate(chosen):
        if long and k:  # spread the filler sentences over the gaps between facts, each used once
            parts.extend(filler[(k - 1) * len(filler) // gaps : k * len(filler) // gaps])
        sentence_start = sum(len(p) + 1 for p in parts)
        parts.append(fact["text"])
        for question, answer, extra in fact["qa"]:
            golds = []
            for text in [answer, *extra]:
                # Whole words only: "74" must not match inside the year "1745".
                match = re.search(rf"(?<!\w){re.escape(text)}(?!\w)", fact["text"])
                if match is None:
                    raise AssertionError(f"{text!r} not in {fact['text']!r}")
                golds.append((text, sentence_start + match.start()))
            answered.append((question, golds))
        impossible.extend(fact["impossible"])
    context = " ".join(parts)
    for _, golds in answered:
        for text, start in golds:
            assert context[start : start + len(text)] == text, (text, start)
    return context, answered, impossible


def squad_rows(task: str) -> dict[str, list[dict]]:
    """{split: rows} for squad / squad_v2: grouped by paragraph like the hub, one gold answer in train."""
    v2 = task == "squad_v2"
    out: dict[str, list[dict]] = {}
    for split, size in LEARNING_SIZES.get(task, SQUAD_SIZES).items():
        rng = random.Random(f"{task}/{split}")
        towns = rng.sample(TOWNS, len(TOWNS))
        rows: list[dict] = []
        # Unanswerable share: about a third in train, half in validation (as the real v2.0 splits).
        n_impossible = (size // 3 if split == "train" else size // 2) if v2 else 0
        n_answerable = size - n_impossible
        t = 0
        while len(rows) < size:
            town = towns[t % len(towns)]
            long = t % 3 == 0  # every third paragraph is long
            context, answered, impossible = _context(rng, town, long)
            rng.shuffle(answered)
            rng.shuffle(impossible)
            have_ans = sum(1 for r in rows if r["answers"]["text"])
            have_imp = len(rows) - have_ans
            take_ans = answered[: min(4 if long else 3, n_answerable - have_ans)]
            take_imp = impossible[: min(2, n_impossible - have_imp)]
            if long and take_ans:
                # Make sure a long paragraph contributes a question answered late in the text.
                latest = max(answered, key=lambda a: a[1][0][1])
                if latest not in take_ans:
                    take_ans[-1] = latest
            title = town.replace(" ", "_")
            for question, golds in take_ans:
                golds = golds[:1] if split == "train" else golds
                rows.append(
                    {
                        "id": _qid(task, split, len(rows)),
                        "title": title,
                        "context": context,
                        "question": question,
                        "answers": {"text": [g[0] for g in golds], "answer_start": [g[1] for g in golds]},
                    }
                )
            for question in take_imp:
                rows.append(
                    {
                        "id": _qid(task, split, len(rows)),
                        "title": title,
                        "context": context,
                        "question": question,
                        "answers": {"text": [], "answer_start": []},
                    }
                )
            t += 1
        out[split] = rows
    return out


# ---------------------------------------------------------------- writing


def render(rows: list[dict]) -> str:
    """JSONL text: one object per line, keys in the hub's column order, UTF-8, trailing newline."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def all_files() -> dict[str, str]:
    """{relative path: file text} of every bundled file."""
    files = {}
    for task in GLUE_MAKERS:
        for split, rows in glue_rows(task).items():
            files[f"glue/{task}/{split}.jsonl"] = render(rows)
    for variant, makers in GLUE_VARIANTS.items():
        for task in makers:
            for split, rows in glue_rows(task, variant).items():
                files[f"{variant}/glue/{task}/{split}.jsonl"] = render(rows)
    for task in ("squad", "squad_v2"):
        for split, rows in squad_rows(task).items():
            files[f"squad/{task}/{split}.jsonl"] = render(rows)
    return files


def write(out: Path) -> dict[str, int]:
    """Write every file under `out` atomically; returns {relative path: bytes}."""
    sizes = {}
    for rel, text in all_files().items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = text.encode("utf-8")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        sizes[rel] = len(data)
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(__file__).resolve().parents[1] / "loralib" / "resources"
    parser.add_argument("--out", type=Path, default=default, help=f"root folder (default {default})")
    args = parser.parse_args(argv)
    sizes = write(args.out)
    for rel, n in sizes.items():
        print(f"{n:>7} B  {rel}")
    print(f"{sum(sizes.values()):>7} B  total, {len(sizes)} files under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
