"""The peers of the fanout benchmark: one-module Django projects serving the same
endpoints as tests/urls.py (``/t/stream/``, ``/t/poll/``, ``/t/publish/``) plus
``/t/count/?channel=`` (subscribers waiting), over an in-process pub/sub."""
