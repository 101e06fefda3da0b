"""The smallest Django project that answers "Hello, world!": no database, one view."""
