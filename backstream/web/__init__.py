"""Files served on ``--http-port``: ``demo/`` is the demo chat page of ``--web``; ``client/``,
the browser client, exists only in a built wheel (setup.py copies ``clients/js/src`` there;
an editable install serves ``clients/js/src`` in place, see ``web_assets.client_folder``)."""
