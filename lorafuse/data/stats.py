"""`DataStats`: what the data pipeline read, kept, dropped and trained on.

Token counts are over the kept rows (train + validation). `target_tokens` counts labels != -100, i.e. the
tokens whose prediction is trained; `masked_share = 1 - target_tokens / tokens_total`. The length histogram has
power-of-two bins over row lengths in tokens (after truncation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class DataStats:
    source: str = ""
    format: str = ""
    template: str = ""
    rows_read: int = 0
    rows_used: int = 0
    rows_train: int = 0
    rows_val: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows
    dropped_where: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few rows ("line 4 of a.jsonl")
    truncated: int = 0
    max_length: int = 0
    tokens_total: int = 0
    target_tokens: int = 0
    longest_prompt: int = 0
    longest_row: int = 0
    boundary_fixes: int = 0
    empty_targets: int = 0  # kept rows whose trained tokens are only special tokens (an empty answer + EOS)
    empty_where: list[str] = field(default_factory=list)
    histogram: list[tuple[int, int, int]] = field(default_factory=list)  # (lo, hi, rows) for lo <= len < hi
    cache_hit: bool = False
    cache_path: str | None = None

    @property
    def rows_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def masked_share(self) -> float:
        return 1.0 - self.target_tokens / self.tokens_total if self.tokens_total else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(rows_dropped=self.rows_dropped, masked_share=self.masked_share)
        return d

    def summary(self) -> list[str]:
        """Human-readable lines for the console and the run log."""
        lines = [
            f"data: {self.source} (format {self.format}, template {self.template})",
            f"rows: {self.rows_read} read, {self.rows_used} used ({self.rows_train} train, {self.rows_val} val), "
            f"{self.rows_dropped} dropped",
        ]
        for reason, n in self.dropped.items():
            where = self.dropped_where.get(reason, [])
            lines.append(f"  dropped {n}: {reason}" + (f" (e.g. {', '.join(where[:3])})" if where else ""))
        lines.append(
            f"tokens: {self.tokens_total:,} total, {self.target_tokens:,} trained "
            f"({self.masked_share:.1%} masked), longest row {self.longest_row}, "
            f"longest prompt {self.longest_prompt}"
        )
        if self.truncated:
            lines.append(
                f"truncated: {self.truncated} rows longer than max_length={self.max_length} "
                "lost their end (raise data.max_length to keep it)"
            )
        if self.empty_targets:
            where = f" (e.g. {', '.join(self.empty_where[:3])})" if self.empty_where else ""
            lines.append(
                f"warning: {self.empty_targets} rows have an empty answer{where}: they train only the end-of-text "
                "token, teaching the model to stop at once; fill them in or remove them"
            )
        if self.boundary_fixes:
            lines.append(f"prompt/target boundary re-tokenized separately in {self.boundary_fixes} chunks")
        lines.append(
            f"cache: {'hit' if self.cache_hit else 'miss'}"
            + (f" ({self.cache_path})" if self.cache_path else " (no cache_dir)")
        )
        return lines


def length_histogram(lengths) -> list[tuple[int, int, int]]:
    """(lo, hi, count) bins with power-of-two edges covering `lengths`; empty bins inside the range kept."""
    lengths = list(lengths)
    if not lengths:
        return []
    hi_edge = 1
    while hi_edge <= max(lengths):
        hi_edge *= 2
    lo_edge = 1
    while lo_edge * 2 <= min(lengths):
        lo_edge *= 2
    bins, lo = [], lo_edge
    while lo < hi_edge:
        bins.append((lo, lo * 2, sum(1 for n in lengths if lo <= n < lo * 2)))
        lo *= 2
    return bins
