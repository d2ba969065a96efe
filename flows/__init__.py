"""Prefect orchestration of the pipelines: ingest and rebuild flows whose embedding batches fan
out through a task runner (threads or Dask), and scheduled deployments. The logic lives in
`pipelines`; flows decide where each step runs.
"""
