"""The logic of ingesting, rebuilding, querying, serving and evaluating, as plain functions and
classes usable without Prefect: sources -> chunking -> embedding (htp_embed) -> the FAISS store
(indexes), the one query path (`pipelines.query`), the HTTP service and the `htp-index` CLI.
"""
