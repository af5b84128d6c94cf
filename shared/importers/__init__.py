"""Rule importers (authoring tools): FortiSIEM XML rule exports and Sigma rules to our rule YAML.

Imported lazily by ``python -m shared import`` only; their extra libraries (pySigma, defusedxml)
are in ``requirements-dev.txt``, not in the Functions app's runtime requirements.
"""
