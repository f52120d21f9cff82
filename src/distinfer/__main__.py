from distinfer.cli import app

app(prog_name="distinfer")
