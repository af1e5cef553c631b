"""ihld: a scheduling daemon for batch LLM work on local inference servers."""

__version__ = "0.1.0"
