"""``python serve_bjoern.py MODULE:CALLABLE PORT``: serve a WSGI callable with bjoern."""

import importlib
import sys

import bjoern

module_name, _, attr = sys.argv[1].partition(":")
app = getattr(importlib.import_module(module_name), attr)
bjoern.run(app, "127.0.0.1", int(sys.argv[2]))
