"""Document filters of the prepare-data map stage: the quality rules every preset applies, and the
web preset's curation (C4 line rules, Gopher quality and repetition rules, language id, PII masking,
decontamination against evaluation data)."""

from __future__ import annotations

from dataclasses import dataclass

from atomlab.data.clean import quality_problem


@dataclass
class Curation:
    min_doc_chars: int = 200
    max_symbol_fraction: float = 0.3
    min_mean_line_chars: float = 5.0

    def apply(self, text: str) -> tuple[str, str | None]:
        """The text to keep (possibly edited) and the reason it is dropped, or None when it is kept."""
        return text, quality_problem(text, self.min_doc_chars, self.max_symbol_fraction, self.min_mean_line_chars)
