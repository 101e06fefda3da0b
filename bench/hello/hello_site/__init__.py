"""The smallest Django project that answers "Hello, world!": no database, a hello view
(and, for bench/files, a JSON hello and a FileResponse download)."""
