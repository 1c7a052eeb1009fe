"""`reasoning-gym:DATASET`: any of reasoning-gym's procedural datasets as an atomlab environment.

Needs the optional extra: `pip install 'atomlab[reasoning-gym]'`; it is imported only when such an
environment is made. Task `index` of `seed` is item `index` of the dataset made with that seed
and size `index + 1` (reasoning-gym seeds each item from the dataset's seed and the item's index;
a few datasets also depend on the size, so the size is pinned to the index to keep every task the
same however many are asked for). Difficulty follows reasoning-gym's curriculum for the dataset:
level d is the curriculum's global level d - 1 (its ranges include the easier levels), so level 1
is the easiest, not the dataset's default configuration; a dataset without a curriculum has one
level, its default configuration.

The prompt is the item's question plus the usual format hint. The verifier is strict where
reasoning-gym's `score_answer` is lenient (many datasets give partial credit when the right answer
appears inside a longer one): the answer extracted from the single <answer> block earns 1 only when
the dataset scores it 1.0, else 0. The reasoning-gym version is in `Task.data`, since items can
change between its releases.
"""

from __future__ import annotations

import difflib
import random
import re
import threading
from typing import Any

from atomlab.envs.base import FORMAT_HINT, Environment, Task, Verdict, answer_tag, user
from atomlab.errors import AtomlabError

INSTALL_HINT = "pip install 'atomlab[reasoning-gym]'"


def _library() -> Any:
    try:
        import reasoning_gym
    except ImportError:
        raise AtomlabError(f"reasoning-gym environments need the reasoning-gym package: {INSTALL_HINT}") from None
    return reasoning_gym


class ReasoningGymEnvironment(Environment):
    version = 1

    def __init__(self, dataset_name: str) -> None:
        library = _library()
        dataset_name = re.sub(r"-v\d+$", "", dataset_name)  # "reasoning-gym:NAME-v1" names the same
        datasets = library.factory.DATASETS
        if dataset_name not in datasets:
            close = difflib.get_close_matches(dataset_name, list(datasets), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; there are {len(datasets)}, e.g. leg_counting"
            raise AtomlabError(f"reasoning-gym has no dataset {dataset_name!r}{hint}")
        self.dataset_name = dataset_name
        self.name = f"reasoning-gym:{dataset_name}"
        self.library_version = getattr(library, "__version__", "unknown")
        self.description = f"reasoning-gym's {dataset_name} (reasoning-gym {self.library_version}), strictly verified"
        self._curriculum = self._make_curriculum(library)
        self.levels = self._curriculum_levels() if self._curriculum is not None else 1
        # The curriculum is set then read, and a few datasets load word lists when made: one at a time,
        # and the last few datasets are kept for the verifier.
        self._lock = threading.Lock()
        self._datasets: dict[tuple[int, int, int], Any] = {}

    def _make_curriculum(self, library: Any) -> Any:
        try:
            return library.factory.create_curriculum(self.dataset_name)
        except Exception:  # datasets without a curriculum raise; they keep their default configuration
            return None

    def _curriculum_levels(self) -> int:
        return max((len(attribute.levels) for attribute in self._curriculum.attributes.values()), default=1)

    def _dataset(self, seed: int, size: int, difficulty: int) -> Any:
        key = (seed, size, difficulty)
        with self._lock:
            if key not in self._datasets:
                library = _library()
                if self._curriculum is None:
                    made = library.create_dataset(self.dataset_name, seed=seed, size=size)
                else:
                    self._curriculum.set_global_level(difficulty - 1)
                    config = self._curriculum.generate_configuration({"seed": seed, "size": size})
                    made = library.factory.DATASETS[self.dataset_name][0](config=config)
                if len(self._datasets) >= 64:
                    self._datasets.pop(next(iter(self._datasets)))
                self._datasets[key] = made
            return self._datasets[key]

    def task(self, seed: int, index: int, difficulty: int = 1) -> Task:
        if not 1 <= difficulty <= self.levels:
            raise ValueError(f"{self.id}: difficulty must be 1..{self.levels}, got {difficulty}")
        if index < 0:
            raise ValueError(f"{self.id}: index must be at least 0, got {index}")
        try:
            entry = self._dataset(seed, index + 1, difficulty)[index]
        except Exception as exc:  # some datasets reject some of their own curriculum levels
            raise AtomlabError(
                f"{self.id} level {difficulty}: reasoning-gym failed: {type(exc).__name__}: {exc}"
            ) from None
        answer = "" if entry.get("answer") is None else str(entry["answer"])
        prompt = f"{entry['question']}\n\n{FORMAT_HINT}"
        data = {"entry": entry, "reasoning_gym_version": self.library_version}
        return Task(self.id, seed, index, difficulty, [user(prompt)], answer, answer_tag(answer), data)

    def make(self, rng: random.Random, difficulty: int) -> tuple[str, str, str, dict[str, Any]]:
        raise NotImplementedError("reasoning-gym makes its own items; see task()")

    def check(self, task: Task, answer: str) -> Verdict:
        entry = task.data["entry"]
        dataset = self._dataset(task.seed, task.index + 1, task.difficulty)
        score = float(dataset.score_answer(answer, entry))
        if score >= 1.0:
            return Verdict(1.0, "correct")
        partial = f" (reasoning-gym would give {score:.2f})" if score > 0 else ""
        return Verdict(0.0, f"wrong answer {answer[:40]!r}{partial}")
