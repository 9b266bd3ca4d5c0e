"""Files served on ``--http-port``: ``client/`` is the browser client (a copy of
``clients/js/src``, checked by the tests), ``demo/`` the demo chat page of ``--web``."""
