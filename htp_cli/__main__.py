"""``python -m htp_cli`` runs the ``htp-index`` command."""

from htp_cli.main import app

app()
