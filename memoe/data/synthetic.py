"""A deterministic synthetic world of made-up people and their attributes: memoe's embedded default dataset.

Why it looks the way it does (see ``../shared/design/testbed-findings.md``):

- Names are *ordered pairs* of shared name words ("Kalo Mira" and "Mira Kalo" are different people), so a
  model cannot identify a subject from a bag of its token embeddings and has to compose the name at its
  last token: that is what makes subject-position storage, as in real LLMs, possible in a tiny model.
- Every subject has every relation, and each relation has five phrasings mixing subject-first and
  subject-late sentences. For each fact one phrasing is *held out* of the pretraining text: recall under it
  tells whether the model stores knowledge per subject (it then answers a sentence it never saw for that
  fact) or per sentence.
- Object vocabularies are disjoint across relations, so a profile line (``Kalo Mira: Osaka, Welsh, ...``)
  still says which relation each object belongs to.

Everything is a pure function of :class:`WorldConfig`, and scales to 100,000 edits in seconds.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from functools import cached_property

from memoe.data.records import EditDataset, EditRecord, EditRequest, LabeledPrompt
from memoe.errors import ConfigError


@dataclass(frozen=True)
class Relation:
    name: str
    templates: tuple[str, ...]  # each with one "{}" for the subject; the object follows the prompt
    objects: tuple[str, ...]


RELATIONS: tuple[Relation, ...] = (
    Relation("birthplace", (
        "{} was born in", "The birthplace of {} is", "{} grew up in the city of",
        "Where was {} born? In", "People say that {} comes from"),
        ("Paris", "Osaka", "Lima", "Cairo", "Oslo", "Dublin", "Madrid", "Berlin", "Nairobi", "Quito", "Hanoi",
         "Zurich", "Lisbon", "Vienna", "Prague", "Warsaw", "Athens", "Seoul", "Bogota", "Havana")),
    Relation("language", (
        "{} speaks", "The native language of {} is", "{} was raised speaking",
        "Which language does {} speak? It is", "At home, {} always talks in"),
        ("French", "Welsh", "Polish", "Greek", "Swahili", "Hindi", "Korean", "Dutch", "Turkish", "Finnish",
         "Tamil", "Basque", "Czech", "Danish", "Latvian", "Zulu")),
    Relation("profession", (
        "{} works as a", "The profession of {} is", "{} earns a living as a",
        "What is the job of {}? A", "Everyone knows that {} is a"),
        ("baker", "pilot", "surgeon", "lawyer", "farmer", "painter", "chemist", "plumber", "nurse", "sailor",
         "tailor", "jeweler", "architect", "librarian", "dentist", "carpenter", "journalist", "geologist")),
    Relation("instrument", (
        "{} plays the", "The favourite instrument of {} is the", "{} performs on the",
        "Which instrument does {} play? The", "On stage, {} is seen with the"),
        ("violin", "cello", "piano", "flute", "trumpet", "harp", "drums", "oboe", "banjo", "clarinet",
         "saxophone", "accordion", "ukulele", "trombone", "harmonica", "mandolin")),
    Relation("sport", (
        "{} is a fan of", "The favourite sport of {} is", "{} spends weekends playing",
        "Which sport does {} like? It is", "On television, {} always watches"),
        ("tennis", "cricket", "hockey", "rugby", "golf", "baseball", "volleyball", "badminton", "boxing",
         "fencing", "rowing", "cycling", "skiing", "surfing", "archery", "wrestling")),
    Relation("employer", (
        "{} is employed by", "The employer of {} is", "{} has a contract with",
        "Who pays the salary of {}? It is", "Every morning, {} drives to the office of"),
        ("Vantor", "Quelix", "Brimco", "Zentra", "Lumora", "Okaby", "Fendix", "Trivel", "Marlow", "Norsk",
         "Calyx", "Dyneo", "Pexora", "Sundar", "Helvo", "Ravena", "Tulip", "Gorvan")),
    Relation("pet", (
        "{} owns a", "The pet of {} is a", "{} takes care of a",
        "What animal lives with {}? A", "In the garden, {} plays with a"),
        ("parrot", "hamster", "tortoise", "rabbit", "goldfish", "ferret", "lizard", "canary", "pony",
         "beagle", "poodle", "iguana", "gecko", "alpaca", "donkey", "goat")),
    Relation("color", (
        "{} likes the colour", "The favourite colour of {} is", "{} always dresses in",
        "Which colour does {} prefer? It is", "The house of {} is painted"),
        ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey", "pink", "brown",
         "teal", "maroon", "beige", "violet", "silver")),
)

#: Short unrelated sentences put in front of prompts (CounterFact-style distracting prefixes).
PREFIXES: tuple[str, ...] = (
    "It rained all day.", "The market was busy.", "A new bridge opened.", "The train was late again.",
    "Prices went up this year.", "The museum is closed on Monday.", "Snow fell in the hills.",
    "The concert sold out.", "A storm hit the coast.", "The library got new books.", "Tea is served at four.",
    "The river froze last winter.", "A comet was seen at night.", "The bakery opens early.",
    "Schools reopened in autumn.", "The festival lasted a week.",
)

GENERATION_TEMPLATES = ("{} is known for", "The life of {} was", "Friends describe {} as", "{} once said that")

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr")
_VOWELS = ("a", "e", "i", "o", "u")


def name_words(n: int, seed: int) -> list[str]:
    """``n`` distinct capitalised two-syllable name words ("Kalo", "Mira", ...)."""
    rng = random.Random(f"names-{seed}")
    syllables = [o + v for o in _ONSETS for v in _VOWELS]
    words: set[str] = set()
    while len(words) < n:
        words.add((rng.choice(syllables) + rng.choice(syllables)).capitalize())
    return sorted(words)


@dataclass(frozen=True)
class WorldConfig:
    """Options of the synthetic world."""

    num_edits: int = 1000
    """Number of edit records; every fact of the world is one record, so the world has this many facts."""
    num_relations: int = 6
    """Relations per subject (at most 8). More relations per subject push storage toward the subject."""
    num_name_words: int = 200
    """Size of the pool of name words; subjects are ordered pairs of distinct words."""
    neighbours: int = 10
    """Neighbourhood prompts per record (other subjects, same relation, same true object)."""
    attributes: int = 10
    """Attribute prompts per record (other subjects whose true object is the new target)."""
    seed: int = 0
    """Everything about the world derives from this seed."""

    def __post_init__(self):
        if not 1 <= self.num_edits <= 100_000:
            raise ConfigError(f"num_edits must be in [1, 100000], got {self.num_edits}")
        if not 1 <= self.num_relations <= len(RELATIONS):
            raise ConfigError(f"num_relations must be in [1, {len(RELATIONS)}], got {self.num_relations}")
        capacity = self.num_name_words * (self.num_name_words - 1)
        if math.ceil(self.num_edits / self.num_relations) > capacity:
            raise ConfigError(f"num_name_words={self.num_name_words} gives only {capacity} subjects; raise it")


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: int  # index into World.relations
    obj: str
    request_template: int  # index of the phrasing used as the edit prompt
    heldout_template: int  # index of the phrasing kept out of the pretraining text


class World:
    """Subjects, their facts and the edit records, all derived from a :class:`WorldConfig`."""

    def __init__(self, config: WorldConfig):
        self.config = config
        self.relations = RELATIONS[: config.num_relations]
        rng = random.Random(config.seed)
        words = name_words(config.num_name_words, config.seed)
        n_subjects = math.ceil(config.num_edits / config.num_relations)
        pairs: set[tuple[str, str]] = set()
        subjects: list[str] = []
        while len(subjects) < n_subjects:
            a, b = rng.sample(words, 2)
            if (a, b) not in pairs:
                pairs.add((a, b))
                subjects.append(f"{a} {b}")
        self.subjects = subjects
        facts = []
        for s in subjects:
            for r, rel in enumerate(self.relations):
                req, held = rng.sample(range(len(rel.templates)), 2)
                facts.append(Fact(s, r, rng.choice(rel.objects), req, held))
        rng.shuffle(facts)
        self.facts: list[Fact] = facts[: config.num_edits]
        self._rng_seed = config.seed

    # -- prompts -------------------------------------------------------------------------------------------
    def template(self, fact: Fact, k: int) -> str:
        return self.relations[fact.relation].templates[k]

    def trained_templates(self, fact: Fact) -> list[int]:
        return [k for k in range(len(self.relations[fact.relation].templates)) if k != fact.heldout_template]

    @cached_property
    def _by_object(self) -> dict[tuple[int, str], list[Fact]]:
        index: dict[tuple[int, str], list[Fact]] = {}
        for f in self.facts:
            index.setdefault((f.relation, f.obj), []).append(f)
        return index

    @cached_property
    def _by_subject(self) -> dict[str, list[Fact]]:
        index: dict[str, list[Fact]] = {}
        for f in self.facts:
            index.setdefault(f.subject, []).append(f)
        return index

    def record(self, i: int) -> EditRecord:
        """Edit record ``i``: change fact ``i`` to another object of the same relation."""
        f = self.facts[i]
        rng = random.Random(f"{self._rng_seed}-{i}")
        rel = self.relations[f.relation]
        new = rng.choice([o for o in rel.objects if o != f.obj])
        fill = lambda g, k: rel.templates[k].replace("{}", g.subject)  # noqa: E731
        trained_other = [k for k in self.trained_templates(f) if k != f.request_template]
        paraphrases = (
            fill(f, f.heldout_template),  # never seen in pretraining for this fact
            f"{rng.choice(PREFIXES)} {fill(f, rng.choice(trained_other))}",
        )
        others = [g for g in self._by_object[(f.relation, f.obj)] if g.subject != f.subject]
        neigh = [fill(g, rng.choice(self.trained_templates(g))) for g in rng.sample(others, min(len(others), self.config.neighbours))]
        attr_facts = [g for g in self._by_object.get((f.relation, new), []) if g.subject != f.subject]
        attrs = [fill(g, rng.choice(self.trained_templates(g))) for g in rng.sample(attr_facts, min(len(attr_facts), self.config.attributes))]
        same = [
            LabeledPrompt(self.relations[g.relation].templates[g.request_template].replace("{}", g.subject), g.obj)
            for g in self._by_subject[f.subject] if g.relation != f.relation
        ]
        return EditRecord(
            request=EditRequest(prompt=rel.templates[f.request_template], subject=f.subject, target_new=new,
                                target_true=f.obj, case_id=i, relation=rel.name),
            paraphrase_prompts=paraphrases,
            neighborhood_prompts=tuple(neigh),
            attribute_prompts=tuple(attrs),
            generation_prompts=tuple(t.replace("{}", f.subject) for t in GENERATION_TEMPLATES),
            same_subject_prompts=tuple(same),
        )

    @cached_property
    def dataset(self) -> EditDataset:
        records = [self.record(i) for i in range(len(self.facts))]
        return EditDataset(name="synthetic", records=records, source="memoe.data.synthetic", meta=asdict(self.config))

    def heldout_prompts(self) -> list[LabeledPrompt]:
        """Each fact under the phrasing that pretraining never showed for it."""
        return [LabeledPrompt(self.template(f, f.heldout_template).replace("{}", f.subject), f.obj) for f in self.facts]

    def training_sentences(self, rng: random.Random, prefix_prob: float = 0.2) -> list[str]:
        """One epoch of pretraining text: every fact under every trained phrasing, plus a profile line per
        subject (attributes directly after the name), some with a distracting prefix. Shuffled by ``rng``."""
        lines = []
        for f in self.facts:
            for k in self.trained_templates(f):
                line = f"{self.template(f, k).replace('{}', f.subject)} {f.obj}."
                if rng.random() < prefix_prob:
                    line = f"{rng.choice(PREFIXES)} {line}"
                lines.append(line)
        for s, facts in self._by_subject.items():
            objs = [g.obj for g in facts]
            rng.shuffle(objs)
            lines.append(f"{s}: {', '.join(objs)}.")
        rng.shuffle(lines)
        return lines


def build_world(config: WorldConfig | None = None) -> World:
    return World(config or WorldConfig())
