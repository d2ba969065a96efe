"""Planning a scheduled ingest of a folder that has not changed: every file read and parsed
again (as before) against the files' recorded stats trusted (``pipelines.file_stats``).

    python benchmarks/unchanged_folder.py [--docs 5183] [--pdfs 500] [--rounds 3]

The folder: SciFact abstracts (the development corpus, when present beside the repository;
else generated sentences) as ``.txt`` and ``.html`` files, and ``--pdfs`` of them as one-page
PDFs written here. The plan is what a run does before it embeds anything: read the folder and
diff it against the index's document hashes. Both ways run in one process, alternating round by
round. Results: benchmarks/results/unchanged_folder.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from machine import cpu_model
from store_scale import sentences

from pipelines.file_stats import FileStatsCache
from pipelines.runs import plan_ingest
from pipelines.sources import SourceDocument, iter_source

RESULTS = Path(__file__).resolve().parent / "results"


def pdf_bytes(text: str) -> bytes:
    """A one-page PDF showing ``text`` in lines (pypdf reads it back)."""
    words, lines, line = text.replace("\\", " ").replace("(", " ").replace(")", " ").split(), [], []
    for word in words:
        line.append(word)
        if len(line) == 12:
            lines.append(" ".join(line))
            line = []
    lines.append(" ".join(line))
    stream = "BT /F1 10 Tf 72 740 Td 12 TL " + " ".join(f"({line}) '" for line in lines) + " ET"
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        "/Resources << /Font << /F1 5 0 R >> >> >>",
        f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = "%PDF-1.4\n", []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n" + "".join(f"{o:010d} 00000 n \n" for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n"
    return out.encode("latin-1", "replace")


def write_folder(root: Path, docs: int, pdfs: int) -> None:
    pool = sentences()
    for i in range(docs):
        text = " ".join(pool[(7 * i + j) % len(pool)] for j in range(8))
        (root / f"a{i}.txt").write_text(text)
        (root / f"b{i}.html").write_text(f"<html><head><title>Doc {i}</title></head><body><p>{text}</p></body></html>")
        if i < pdfs:
            (root / f"c{i}.pdf").write_bytes(pdf_bytes(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=5183, help="texts, each written as a .txt and an .html file")
    parser.add_argument("--pdfs", type=int, default=500, help="of them also written as one-page PDFs")
    parser.add_argument("--rounds", type=int, default=3, help="plans per way (alternating)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder the results files are written to")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)  # before the run: a bad --out fails now, not after it
    with tempfile.TemporaryDirectory() as tmp:
        root, index = Path(tmp) / "src", Path(tmp) / "index"
        root.mkdir()
        write_folder(root, args.docs, args.pdfs)
        time.sleep(2.5)  # past the racy window: the files are settled before the first run reads them
        # what the index holds after a first run: every document with its hash, and the stats
        first = FileStatsCache.for_source(index, root, 20 * 2**20, cache_dir=Path(tmp) / "cache")
        indexed = {item.doc_id: item.content_hash for item in first.observe(iter_source(root))
                   if isinstance(item, SourceDocument)}
        assert not first.records.broken, first.records.broken
        first.records.save(indexed)
        times: dict[str, list[float]] = {"read every file": [], "stats trusted": []}
        for round_ in range(args.rounds):
            for way in (list(times) if round_ % 2 == 0 else list(times)[::-1]):
                began = time.perf_counter()
                if way == "read every file":
                    plan = plan_ingest(iter_source(root), indexed)
                else:
                    cache = FileStatsCache.for_source(index, root, 20 * 2**20, cache_dir=Path(tmp) / "cache")
                    plan = plan_ingest(iter_source(root, known=cache.known(indexed)), indexed)
                times[way].append(time.perf_counter() - began)
                assert len(plan.unchanged) == len(indexed) and not (plan.new or plan.changed or plan.deleted)
                print(way, f"{times[way][-1]:.3f} s", flush=True)
    files = 2 * args.docs + min(args.pdfs, args.docs)
    rows = {way: round(statistics.median(t), 3) for way, t in times.items()}
    result = {"cpu": cpu_model(), "files": files, "docs": args.docs, "pdfs": min(args.pdfs, args.docs),
              "rounds": args.rounds, "plan_seconds_median": rows}
    (args.out / "unchanged_folder.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Planning an unchanged folder ({result['cpu']})", "",
             f"{files:,} files ({args.docs:,} .txt, {args.docs:,} .html, {result['pdfs']:,} one-page .pdf), all "
             f"indexed and unchanged; median of {args.rounds} plans per way, alternating.", "",
             "| way | plan (read + diff) | per file |", "|---|---|---|"]
    for way, seconds in rows.items():
        lines.append(f"| {way} | {seconds:.2f} s | {1e6 * seconds / files:.0f} us |")
    lines += ["", f"Ratio: {rows['read every file'] / rows['stats trusted']:.1f}x."]
    from results_file import write_markdown

    write_markdown(args.out / "unchanged_folder.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
