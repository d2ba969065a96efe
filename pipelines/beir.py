"""Loading BEIR-format retrieval datasets, and subsampling them reproducibly.

A BEIR dataset is a folder with ``corpus.jsonl`` (``_id``, ``title``, ``text``),
``queries.jsonl`` (``_id``, ``text``) and ``qrels/<split>.tsv`` (a header line, then
``query-id  corpus-id  score``). Everything here is plain Python data so that evaluation
can hash exactly what was embedded and the tests can build a dataset in a few lines.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from indexes.text import has_visible_text
from pipelines.errors import DatasetError, DocumentRejected
from pipelines.sources import require_text

log = logging.getLogger(__name__)

Qrels = dict[str, dict[str, int]]
"""query id -> {document id -> graded relevance}, as pytrec_eval takes it."""

SENTENCE_END = (".", "!", "?", '"', "'")


@dataclass(frozen=True)
class Document:
    """One corpus entry."""

    title: str
    text: str

    def embedding_text(self) -> str:
        """The text that is embedded: ``"<title>. <text>"``.

        The title is kept (it carries most of the topic words of a SciFact abstract) and ends
        with a full stop when it has no sentence-final punctuation of its own, so that HTP's
        sentence segmenter puts the title in a block of its own instead of gluing it onto the
        first sentence of the abstract. A missing title or text leaves the other alone.
        """
        title, text = self.title.strip(), self.text.strip()
        if not title:
            return text
        if not text:
            return title
        if not title.endswith(SENTENCE_END):
            title += "."
        return f"{title} {text}"


@dataclass(frozen=True)
class BeirDataset:
    """A corpus, its queries and the relevance judgements of one split.

    ``queries`` only holds queries that have at least one judgement in ``qrels``: the others
    cannot be scored and would only cost embedding time.
    """

    name: str
    split: str
    corpus: dict[str, Document]
    queries: dict[str, str]
    qrels: Qrels
    notes: dict[str, object] = field(default_factory=dict)

    def doc_ids(self) -> list[str]:
        """Document ids in a fixed order (the corpus file's order): row i of the matrix."""
        return list(self.corpus)

    def doc_texts(self) -> list[str]:
        return [self.corpus[i].embedding_text() for i in self.doc_ids()]

    def query_ids(self) -> list[str]:
        return list(self.queries)

    def query_texts(self) -> list[str]:
        return [self.queries[i] for i in self.query_ids()]

    def corpus_hash(self) -> str:
        """SHA-256 of the ordered ids and embedded texts: any change to the documents that are
        embedded (subsample, seed, text formatting) gives another hash and so another cache key."""
        return _hash_pairs(zip(self.doc_ids(), self.doc_texts(), strict=True))

    def queries_hash(self) -> str:
        return _hash_pairs(zip(self.query_ids(), self.query_texts(), strict=True))


def _hash_pairs(pairs: Iterable[tuple[str, str]]) -> str:
    digest = hashlib.sha256()
    for key, text in pairs:
        digest.update(key.encode())
        digest.update(b"\x00")
        digest.update(text.encode())
        digest.update(b"\x01")
    return digest.hexdigest()


def read_jsonl(path: Path) -> Iterable[tuple[int, dict]]:
    """The records of a JSON Lines file with their line numbers (blank lines skipped)."""
    if not path.is_file():
        raise DatasetError(f"{path} is missing: a BEIR dataset holds corpus.jsonl, queries.jsonl and qrels/<split>.tsv")
    with open(path, encoding="utf-8-sig") as handle:  # a BOM (Windows editors) as ingest takes it
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{number}: not a JSON record ({exc.msg})") from None
            if not isinstance(record, dict) or "_id" not in record:
                raise DatasetError(f"{path}:{number}: a record needs an \"_id\" field")
            yield number, record


def read_qrels(path: Path, notes: dict[str, int] | None = None) -> Qrels:
    """Read ``qrels/<split>.tsv``: a header line (``query-id corpus-id score``) is skipped when
    there is one, a file without one keeps its first judgement.

    A line that is not three tab-separated fields, or that grades a pair already graded
    otherwise, is refused by line number: skipping it (as this did) or keeping the last grade
    changed the figures without a word. A pair repeated with the same grade is counted in
    ``notes["repeated_judgements"]``."""
    qrels: Qrels = {}
    where: dict[tuple[str, str], int] = {}
    with open(path, encoding="utf-8-sig", newline="") as handle:
        for number, row in enumerate(csv.reader(handle, delimiter="\t"), 1):
            if not any(cell.strip() for cell in row):
                continue  # a blank line
            if len(row) != 3:
                # BEIR's own loader reads the first three of more; a TREC line (query-id, 0,
                # corpus-id, score) was then a judgement of the document "0" without a word
                trec = " (a TREC qrels line: drop its second column)" if len(row) == 4 else ""
                raise DatasetError(f"{path}:{number}: {len(row)} tab-separated field(s) where a judgement has "
                                   f"3 (query-id, corpus-id, score){trec}: {chr(9).join(row)[:80]!r}")
            try:
                value = float(row[2])
            except ValueError:
                if number == 1:
                    continue  # the header
                raise DatasetError(f"{path}:{number}: score {row[2]!r} is not a number") from None
            if not value.is_integer():
                # int() turned 0.5 into "not relevant" without a word; BEIR refuses such a row too
                raise DatasetError(f"{path}:{number}: score {row[2]!r} is not a whole number (relevance "
                                   "grades are integers: 0 not relevant, 1, 2, ... more relevant)")
            # ids as ingest reads them (sources._record_id strips an _id): ' d4 ' judged a hit
            # the product returns as 'd4' a miss
            query_id, doc_id = row[0].strip(), row[1].strip()
            judged = qrels.setdefault(query_id, {})
            if doc_id in judged:
                if judged[doc_id] != int(value):
                    raise DatasetError(f"{path}:{number}: query {query_id!r} grades document {doc_id!r} "
                                       f"{int(value)}, where line {where[query_id, doc_id]} graded it "
                                       f"{judged[doc_id]}; keep one of the two")
                if notes is not None:
                    notes["repeated_judgements"] = notes.get("repeated_judgements", 0) + 1
                continue
            judged[doc_id] = int(value)
            where[query_id, doc_id] = number
    return qrels


def load_beir(dataset_dir: str | Path, split: str = "test") -> BeirDataset:
    """Load a BEIR folder; queries without judgements in ``split`` are dropped.

    Judgements that point at documents missing from the corpus are dropped too (with a note),
    because no run can ever retrieve them and they would silently cap recall.
    """
    root = Path(dataset_dir)
    qrels_path = root / "qrels" / f"{split}.tsv"
    if not qrels_path.exists():
        available = sorted(p.stem for p in (root / "qrels").glob("*.tsv"))
        raise DatasetError(f"no qrels for split {split!r} in {root} (available: {', '.join(available) or 'none'}; "
                           "choose one with --split)")
    corpus: dict[str, Document] = {}
    repeated = empty = 0
    corpus_path = root / "corpus.jsonl"
    for number, row in read_jsonl(corpus_path):
        # the id as ingest reads it, and the first of two records with one id, as ingest keeps
        # it (a dict kept the last: eval scored another corpus than the product indexes)
        doc_id = str(row["_id"]).strip()
        if doc_id in corpus:
            repeated += 1
            continue
        # "text" was read as "" when missing and as "12345" when a number: refused as ingest
        # refuses them, by line rather than after an ingest (--pipeline) or never (--method)
        title, text = row.get("title"), row.get("text")
        if not isinstance(text, str) or not isinstance(title, str | None):
            field = "text" if not isinstance(text, str) else "title"
            raise DatasetError(f"{corpus_path}:{number}: a document needs a \"text\" string (and a "
                               f"\"title\" string or none); its \"{field}\" is {json.dumps(row.get(field))[:40]}")
        try:  # ingest leaves out what it cannot read (empty, invisible only, binary): so does eval
            require_text(f"{title or ''}\n\n{text}")
        except DocumentRejected:
            empty += 1  # no run can retrieve it; --pipeline failed on it, --method scored it
            continue
        corpus[doc_id] = Document(title or "", text)
    all_queries: dict[str, str] = {}
    repeated_queries = 0
    queries_path = root / "queries.jsonl"
    for number, row in read_jsonl(queries_path):
        if not isinstance(row.get("text"), str) or not has_visible_text(row["text"]):
            raise DatasetError(f"{queries_path}:{number}: a query needs a \"text\" string with a visible "
                               "character (not empty, whitespace, controls or zero-width characters only)")
        query_id = str(row["_id"]).strip()
        if query_id in all_queries:  # the first is kept, as for the corpus; said, not silent
            repeated_queries += 1
            continue
        all_queries[query_id] = row["text"]
    qrels_notes: dict[str, int] = {}
    qrels = read_qrels(qrels_path, qrels_notes)
    missing = sum(1 for judged in qrels.values() for d in judged if d not in corpus)
    unasked = sum(1 for q in qrels if q not in all_queries)
    qrels = {
        q: {d: s for d, s in judged.items() if d in corpus}
        for q, judged in qrels.items()
        if q in all_queries
    }
    emptied = sum(1 for judged in qrels.values() if not judged)  # every judged document missing
    qrels = {q: judged for q, judged in qrels.items() if judged}
    queries = {q: text for q, text in all_queries.items() if q in qrels}
    if not queries:
        # Scoring nothing would report 0.0 everywhere, as if retrieval had failed.
        raise DatasetError(f"no query of {root / 'queries.jsonl'} has a judgement in {qrels_path} that "
                         "points into the corpus (do the query and document ids match?)")
    repeated_judgements = qrels_notes.get("repeated_judgements", 0)
    # judged, but nothing relevant (every grade 0 or below): scored 0 on every metric, as BEIR's
    # own evaluator scores them; said, so that a low mean is not read as poor retrieval alone
    unanswerable = sum(1 for judged in qrels.values() if max(judged.values()) <= 0)
    if repeated or empty or missing or emptied or unasked or repeated_queries or repeated_judgements or unanswerable:
        log.warning("%s: %s", root, "; ".join(text for count, text in (
            (repeated, f"{repeated} corpus record(s) repeat an _id (the first is kept, as ingest keeps it)"),
            (empty, f"{empty} corpus record(s) have no readable text (empty, invisible characters only, or binary; "
                    "left out, as ingest leaves them out)"),
            (repeated_queries, f"{repeated_queries} quer(ies) repeat an _id (the first is kept)"),
            (repeated_judgements, f"{repeated_judgements} judgement line(s) repeat a pair with its grade"),
            (missing, f"{missing} judgement(s) name documents missing from the corpus and are dropped"),
            (emptied, f"{emptied} quer(ies) judge only missing documents and are dropped"),
            (unasked, f"{unasked} judged quer(ies) are missing from queries.jsonl and are dropped"),
            (unanswerable, f"{unanswerable} quer(ies) judge no document relevant (grades 0 or below): each "
                           "scores 0 on every metric, as in BEIR's evaluator"),
        ) if count))
    counts = {"repeated_doc_ids": repeated, "empty_docs": empty, "repeated_query_ids": repeated_queries,
              "repeated_judgements": repeated_judgements, "dropped_judgements_missing_docs": missing,
              "dropped_queries_all_judged_docs_missing": emptied,
              "dropped_judged_queries_missing": unasked, "queries_without_relevant_docs": unanswerable}
    notes: dict[str, object] = {key: count for key, count in counts.items() if count}
    return BeirDataset(root.name, split, corpus, queries, qrels, notes)


def subsample(
    dataset: BeirDataset,
    *,
    max_docs: int | None = None,
    max_queries: int | None = None,
    seed: int = 0,
) -> BeirDataset:
    """A smaller dataset that keeps the evaluation honest.

    ``max_queries`` keeps that many queries chosen with ``seed``. ``max_docs`` keeps *every*
    judged document of the kept queries plus ``max_docs`` other documents chosen with
    ``seed``: dropping a judged document would make a query unanswerable, whereas the extra
    documents are the distractors that make retrieval hard. ``None`` keeps everything.
    The corpus keeps the file's order, so the same arguments always give the same hash.
    """
    queries = dataset.queries
    if max_queries is not None and max_queries < len(queries):
        chosen = set(random.Random(seed).sample(sorted(queries), max_queries))
        queries = {q: t for q, t in queries.items() if q in chosen}
    qrels = {q: dataset.qrels[q] for q in queries}
    corpus = dataset.corpus
    notes = dict(dataset.notes)
    if max_docs is not None:
        judged = {d for docs in qrels.values() for d in docs}
        others = sorted(d for d in corpus if d not in judged)
        extra = set(random.Random(seed + 1).sample(others, min(max_docs, len(others))))
        keep = judged | extra
        corpus = {d: doc for d, doc in corpus.items() if d in keep}
        notes.update(judged_docs=len(judged), extra_docs=len(extra))
    notes.update(max_docs=max_docs, max_queries=max_queries, seed=seed)
    return BeirDataset(dataset.name, dataset.split, corpus, queries, qrels, notes)


def write_beir(
    root: str | Path,
    corpus: Mapping[str, Document],
    queries: Mapping[str, str],
    qrels: Qrels,
    split: str = "test",
) -> Path:
    """Write a dataset in BEIR format (for tests and synthetic tasks such as long documents)."""
    root = Path(root)
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as handle:
        for doc_id, doc in corpus.items():
            handle.write(json.dumps({"_id": doc_id, "title": doc.title, "text": doc.text}) + "\n")
    with open(root / "queries.jsonl", "w", encoding="utf-8") as handle:
        for query_id, text in queries.items():
            handle.write(json.dumps({"_id": query_id, "text": text}) + "\n")
    with open(root / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as handle:
        handle.write("query-id\tcorpus-id\tscore\n")
        for query_id, judged in qrels.items():
            for doc_id, score in judged.items():
                handle.write(f"{query_id}\t{doc_id}\t{score}\n")
    return root
