"""runserver serving no static files by default, as ``whitenoise.runserver_nostatic``
makes it (an app listed before django.contrib.staticfiles)."""

from django.contrib.staticfiles.management.commands.runserver import Command as Runserver


class Command(Runserver):
    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.set_defaults(use_static_handler=False)
