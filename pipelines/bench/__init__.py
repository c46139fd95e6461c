"""The benchmark job (``anomdiff bench``, ``python -m pipelines.bench``): every figure a ratio measured
side by side in one run. ``job`` runs the sections in order (its docstring has the commands and the
order of work); each section has its module (``ingest``, ``training``, ``zero``, ``scoring``,
``metrics``, ``scaling``, ``methods``, ``gpu``), ``measure`` holds the shared tools, ``sizes`` the
sizes and targets, ``report`` the README's table."""
