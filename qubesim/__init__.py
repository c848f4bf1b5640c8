"""qubesim: a local simulator of the Qubes OS parts the qubes_infra.build collection touches."""

__version__ = "0.1.0"
