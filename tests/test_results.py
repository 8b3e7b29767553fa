"""`make results`: the committed docs/results pages are exactly what the generator makes from the CSVs."""

from pathlib import Path

from medfound.eval.results import SAM_DATASETS, SAM_MODELS, render

ROOT = Path(__file__).parent.parent / "docs" / "results"


def test_committed_pages_equal_generated(tmp_path):
    pages = render(ROOT, tmp_path, plots=False)
    assert len(pages) >= 8
    for page in pages:
        committed = ROOT.parent / page.name if page.name == "paths.md" else ROOT / page.name
        assert committed.is_file(), f"{committed} missing: run `make results`"
        assert committed.read_text() == page.read_text(), f"{committed.name} differs from its CSVs: run `make results`"
        for plot in (line.split("](")[1].rstrip(")") for line in page.read_text().splitlines() if line.startswith("![")):
            assert (ROOT / plot).is_file(), plot


def test_every_csv_is_used_by_a_page():
    text = "\n".join(p.read_text() for p in (ROOT / "templates").glob("*.md"))
    code = (Path(__file__).parent.parent / "src" / "medfound" / "eval" / "results.py").read_text()
    for csv in (ROOT / "data").rglob("*.csv"):
        stem = csv.stem.removesuffix("_results").removesuffix("_summary").removesuffix("_structures").removesuffix("_sam_masks")
        sam = {f"{m}_{d}" for _, m in SAM_MODELS for _, d in SAM_DATASETS}
        assert stem in code or stem in text or stem in sam or csv.parent.name == "label_efficiency", \
            f"{csv} is used by no page"
