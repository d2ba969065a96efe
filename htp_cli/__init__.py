"""The ``htp-index`` command line: the application layer above ``pipelines`` (the in-process
engine, query and service) and ``flows`` (the same engine as Prefect flows).

Packages depend downwards only: ``htp_cli`` -> ``flows`` -> ``pipelines`` -> ``indexes`` and
``htp_embed``; ``indexes`` and ``htp_embed`` know nothing of each other.
"""
