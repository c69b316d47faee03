from dvsft.cli import app

app()
