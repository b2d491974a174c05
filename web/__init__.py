"""`sspry web`: a REST API and a page for analysts over a `sspry.Database` or `sspry.connect()` Cluster
(app.py: the routes; jobs.py: the SQLite job store and the threads that run searches; serve.py: the
listening socket, TLS, the state directory; static/: the page, plain HTML/CSS/JS without a build)."""
