"""The logic of ingesting, rebuilding, querying, serving and evaluating, as plain functions and
classes usable without Prefect: sources -> chunking -> embedding (htp_embed) -> the FAISS store
(indexes). `pipelines.engine.IndexSession` is the one engine for ingest and rebuild (the CLI
and the Prefect flows both drive it); `pipelines.query` is the one query path, used by the
CLI, the HTTP service and LlamaIndex retrievers. Nothing here imports `flows` or `htp_cli`.
"""
