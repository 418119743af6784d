"""The client x category table: how non-IID a partition is, as text and CSV."""

from __future__ import annotations

import csv
import dataclasses
import pathlib

import numpy as np


@dataclasses.dataclass(frozen=True)
class CategoryTable:
    """``counts[client, category]`` rows of each category per client."""

    categories: list[str]
    counts: np.ndarray
    client_names: list[str]

    def to_text(self) -> str:
        """A fixed-width table with row and column totals."""
        head = ["client", *self.categories, "total"]
        body = [
            [name, *map(str, row), str(int(row.sum()))]
            for name, row in zip(self.client_names, self.counts, strict=True)
        ]
        body.append(["total", *map(str, self.counts.sum(0)), str(int(self.counts.sum()))])
        widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]

        def fmt(r: list[str]) -> str:
            return "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True))

        return "\n".join([fmt(head), *map(fmt, body)])

    def to_csv(self, path: str | pathlib.Path) -> None:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["client", *self.categories])
            for name, row in zip(self.client_names, self.counts, strict=True):
                w.writerow([name, *row.tolist()])


def client_category_table(
    partition: list[np.ndarray], categories: np.ndarray, client_names: list[str] | None = None
) -> CategoryTable:
    """Count each category's rows per client (``partition`` holds indices into ``categories``)."""
    categories = np.asarray(categories)
    names = sorted(set(categories.tolist()))
    col = {c: i for i, c in enumerate(names)}
    counts = np.zeros((len(partition), len(names)), np.int64)
    for k, rows in enumerate(partition):
        for c in categories[rows]:
            counts[k, col[c]] += 1
    return CategoryTable(names, counts, client_names or [str(k) for k in range(len(partition))])
