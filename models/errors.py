"""The one exception type every component raises for bad input.

It lives on the generative side so that ``models`` and ``guides`` can raise it without importing
the engine; the engine re-exports it as :class:`ppl_vae.ConfigError`.
"""


class ConfigError(ValueError):
    """Bad input: a message naming what was expected and what arrived.

    The CLI turns it into a one-line ``error: ...`` and exit code 2.
    """
