"""A throw-away Typer app around ``eval_command``, to try ``htp-index eval`` before the lead
registers it in the real CLI:

    .venv/bin/python benchmarks/quality/try_cli.py /work/shared/data/scifact --method bm25 --json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import typer  # noqa: E402

from htp_cli.eval_command import eval_command  # noqa: E402

app = typer.Typer(add_completion=False)
app.command("eval")(eval_command)

if __name__ == "__main__":
    app()
