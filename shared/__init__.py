"""defender-correlator: FortiSIEM-style correlation rules for Microsoft Defender alerts.

The package is the product's pure core (rules, normalization, windowing) plus thin edges (state
stores, Azure Functions handlers, webhook delivery) behind small interfaces.
"""

__version__ = "0.1.0"
