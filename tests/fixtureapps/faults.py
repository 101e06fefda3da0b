"""The hello app, served with errors injected into the server's own callbacks from C:
``TEST_FAULTS=Class.method,...`` makes each named method raise on its first call (the
classes are patched before the server is made, which binds its callbacks)."""

import os

from django_comet.evloop.connections import ConnectionGuard
from django_comet.evloop.server import Server

from .apps import hello

CLASSES = {"Server": Server, "ConnectionGuard": ConnectionGuard}


def fail_once(cls: type, name: str) -> None:
    original = getattr(cls, name)
    failed = []

    def failing(self, *args):
        if not failed:
            failed.append(True)
            raise RuntimeError(f"injected fault in {cls.__name__}.{name}")
        return original(self, *args)

    setattr(cls, name, failing)


for fault in filter(None, os.environ.get("TEST_FAULTS", "").split(",")):
    class_name, method = fault.split(".")
    fail_once(CLASSES[class_name], method)

app = hello
