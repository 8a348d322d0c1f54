"""The published-tables check (``experiments/benchmarks/published.py``): its marks, its
entries and how it reads an output of several tables."""

from pathlib import Path

from experiments.benchmarks import published

ROOT = Path(__file__).resolve().parents[1]


def test_every_mark_has_an_entry_and_every_entry_a_mark():
  pages = [ROOT / "README.md", *sorted((ROOT / "docs" / "guides").glob("*.md"))]
  marked = set(published.published_tables(pages))
  assert marked == set(published.PUBLISHED)


def test_an_entry_that_reuses_a_run_names_one_with_the_same_command():
  # Before: the feedback rounds' entry named no run and its 9-minute command ran twice.
  reusing = {n: s for n, s in published.PUBLISHED.items() if s.run is not None}
  assert "lm_feedback_rounds" in reusing
  for name, spec in reusing.items():
    assert published.PUBLISHED[spec.run].command == spec.command, name


def test_the_second_table_of_an_output_is_compared_and_the_first_is_not():
  output = [
    "# a run",
    "| regime | a |",
    "|---|---|",
    "| nft (NFT) | 0.5000 ± 0.1000 |",
    "text between",
    "| regime | b |",
    "|---|---|",
    "| nft (NFT) | 0.7000 ± 0.2000 |",
  ]
  page = ["| regime | b |", "|---|---|", "| `nft` (NFT) | 0.7000 ± 0.2000 |"]
  assert published.output_table(output, 1) == ["# a run", "text between", *output[5:]]
  assert published.compare(page, published.output_table(output, 1)) == []
  assert published.compare(page, published.output_table(output, 0)) != []
