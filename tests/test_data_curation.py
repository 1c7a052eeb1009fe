"""The web preset's curation: C4 line rules, Gopher rules, language id, PII masking, decontamination."""

import json

import pytest

from atomlab.data.filters import c4_lines, gopher_quality, gopher_repetition, identify_language, mask_pii
from atomlab.data.prepare import prepare_data, read_provenance
from atomlab.posttrain.tasks import held_out_tasks
from atomlab.recipe import DataConfig, EvaluateConfig
from atomlab.steps import StepContext
from tests.test_data import distinct_text

PROSE = (
    "The river rose in the night and the town woke to find the bridge gone. "
    "People gathered on the bank to watch the water carry branches and boards past the mill. "
    "By noon the rain had stopped, and the baker opened his shop as he did every day. "
    "Children ran along the path with sticks, and their mothers called them back from the edge. "
    "In the evening the mayor spoke to the crowd and promised that a new bridge would be built. "
    "Nobody believed him, but everyone cheered, because it had been a long and tiring day."
)

PROSE_2 = (
    "Our garden has three apple trees, and every autumn we pick more fruit than we can eat. "
    "My grandmother taught me to make a pie with a thin crust and plenty of cinnamon. "
    "We give the rest of the apples to the neighbours, who return the favour with jam in the spring. "
    "Last year a storm broke the oldest tree, so we planted a young one beside the fence. "
    "It will take several years before it bears fruit, but we are patient people. "
    "Until then the other two trees will have to carry the harvest on their own."
)
PROSE_3 = (
    "The train to the coast leaves at seven, and it is always full of students with large bags. "
    "From the window you can see fields of wheat, small villages and, later, the grey line of the sea. "
    "Most passengers sleep or read, while a few play cards at the tables near the door. "
    "When the train stops at the last station, everyone hurries towards the beach at once. "
    "The cafes along the front open early for them and sell coffee, bread and fresh fish. "
    "By the afternoon the sand is crowded, and the quiet morning seems very far away."
)


def test_c4_line_rules():
    text = PROSE + "\nClick here\nThis site uses cookies to improve your experience.\nEnable javascript to see it.\n"
    kept, problem = c4_lines(text)
    assert problem is None and kept == PROSE + "\n"
    assert c4_lines(PROSE + "\nLorem ipsum dolor sit amet.")[1] == "c4: lorem ipsum"
    assert c4_lines(PROSE + "\nfunction f() { return 1; }")[1] == "c4: curly bracket (code)"
    assert c4_lines("One sentence only here.\nAnd another one here.\n")[1] == "c4: fewer than 5 sentences"


def test_gopher_rules():
    assert gopher_quality(PROSE) is None and gopher_repetition(PROSE) is None
    assert gopher_quality("the cat sat on the mat") == "gopher: word count outside 50-100,000"
    assert gopher_quality(" ".join(["xylophone quartz zephyr"] * 30)) == "gopher: fewer than 2 stop words"
    assert gopher_quality(" ".join(["#tag the of"] * 30)) == "gopher: symbol/word ratio above 0.1"
    spam = "\n".join(["Buy the best shoes of the year now."] * 10 + [PROSE])
    assert gopher_repetition(spam) == "gopher: duplicate lines"
    repeated = PROSE + " " + "fresh bread and warm milk are sold at the corner shop every single morning " * 5
    assert gopher_repetition(repeated) == "gopher: duplicated 5-grams"


def test_pii_masking():
    text = "Write to jane.doe@example.org or call 192.168.1.20 (or 2001:db8::8a2e:370:7334); 1.2.3.999 is no address."
    assert mask_pii(text) == "Write to <EMAIL> or call <IP> (or <IP>); 1.2.3.999 is no address."


def test_language_id_works_offline():
    pytest.importorskip("py3langid")
    assert identify_language(PROSE)[0] == "en"
    german = "Der Fluss stieg in der Nacht, und die Stadt erwachte und fand die Brücke nicht mehr vor. " * 3
    language, probability = identify_language(german)
    assert language == "de" and probability > 0.9


def test_web_preset_drops_other_languages_and_masks_pii(tmp_path):
    pytest.importorskip("py3langid")
    german = "Der Fluss stieg in der Nacht, und die Stadt erwachte und fand die Brücke nicht mehr vor. " * 8
    rows = [text + f" Mail me at person{i}@example.com today." for i, text in enumerate((PROSE, PROSE_2, PROSE_3))]
    (tmp_path / "web.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in [*rows, german]))
    out = tmp_path / "out"
    out.mkdir()
    config = DataConfig(sources=["web.jsonl"], preset="web", decontaminate_environments=False, val_fraction=0.3)
    prepare_data(StepContext(None, out, {}, False, 1), config, tmp_path)
    reasons = {r["id"]: r["reason"] for r in read_provenance(out)}
    assert reasons["web.jsonl:4"].startswith("language de")
    texts = [json.loads(line)["text"] for f in sorted(out.glob("*-0000*.jsonl")) for line in open(f)]
    assert texts and all("<EMAIL>" in t and "@example.com" not in t for t in texts)


def test_decontamination_against_files_and_held_out_tasks(tmp_path):
    evaluate = EvaluateConfig(environments=["arithmetic"], tasks=5)
    task = held_out_tasks(evaluate, 1)[0]
    question = task.messages[-1]["content"]
    benchmark_line = "the quick brown fox jumps over the lazy dog while thirteen small birds sing in the old oak tree"
    (tmp_path / "bench.jsonl").write_text(json.dumps({"question": benchmark_line, "answer": "fox"}) + "\n")
    docs = [distinct_text(i) for i in range(6)]
    docs[1] = docs[1] + benchmark_line.capitalize() + ".\n"
    docs[2] = docs[2] + question + f" {task.answer}\n"
    (tmp_path / "docs").mkdir()
    for i, text in enumerate(docs):
        (tmp_path / "docs" / f"d{i}.txt").write_text(text)
    out = tmp_path / "out"
    out.mkdir()
    config = DataConfig(sources=["docs"], decontaminate=["bench.jsonl"], decontaminate_environments=True)
    prepare_data(StepContext(None, out, {}, False, 1), config, tmp_path, evaluate)
    reasons = {r["id"]: r["reason"] for r in read_provenance(out)}
    assert reasons["docs/d1.txt"] == "decontamination: shares a 13-word sequence with bench.jsonl:1"
    assert reasons["docs/d2.txt"].startswith("decontamination:") and task.id in reasons["docs/d2.txt"]
    assert sum(r is None for r in reasons.values()) == 4
    stats = json.loads((out / "data_stats.json").read_text())
    assert sum(n for r, n in stats["stages"][1]["dropped"].items() if r.startswith("decontamination")) == 2


def _repetition_by_definition(text: str) -> str | None:
    """Gopher's n-gram rules the plain way (np.unique over every n), to check the fast one against."""
    import re

    import numpy as np

    from atomlab.data.filters import DUPLICATE_NGRAM_LIMITS, TOP_NGRAM_LIMITS

    words = re.findall(r"\w+", text.lower())
    vocabulary: dict[str, int] = {}
    ids = np.array([vocabulary.setdefault(w, len(vocabulary) + 1) for w in words], dtype=np.uint64)
    chars = np.array([len(w) for w in words], dtype=np.int64)
    total, prefix = int(chars.sum()) or 1, np.concatenate([[0], np.cumsum(chars)])
    for n, limit in {**TOP_NGRAM_LIMITS, **DUPLICATE_NGRAM_LIMITS}.items():
        if len(words) < n:
            continue
        grams = np.zeros(len(words) - n + 1, dtype=np.uint64)
        for k in range(n):
            grams = grams * np.uint64(1_000_003) + ids[k : len(words) - n + 1 + k]
        _, inverse, counts = np.unique(grams, return_inverse=True, return_counts=True)
        if n in TOP_NGRAM_LIMITS:
            top = int(np.argmax(counts))
            first = int(np.flatnonzero(inverse == top)[0])
            if counts[top] > 1 and (prefix[first + n] - prefix[first]) * counts[top] / total > limit:
                return f"gopher: top {n}-gram too frequent"
            continue
        covered = np.zeros(len(words), dtype=bool)
        for start in np.flatnonzero(counts[inverse] > 1):
            covered[start : start + n] = True
        if chars[covered].sum() / total > limit:
            return f"gopher: duplicated {n}-grams"
    return None


def test_gopher_repetition_stops_early_only_when_the_answer_is_already_known():
    """Repeated runs of every length, alone and mixed: each n-gram verdict, and None, as the definition gives."""
    import random

    rng = random.Random(5)
    words = PROSE.split()
    seen = set()
    for _ in range(300):
        text = list(words)
        for _ in range(rng.randint(0, 3)):
            run, at = rng.randint(2, 12), rng.randint(0, len(words) - 12)
            text += text[at : at + run] * rng.randint(1, 4)
        joined = " ".join(text)
        expected = _repetition_by_definition(joined)
        assert gopher_repetition(joined) == expected
        seen.add(expected)
    assert {None, "gopher: duplicated 5-grams"} <= seen and len(seen) >= 4  # the cases were really exercised
