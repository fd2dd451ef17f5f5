"""Errors that mean "the configuration is wrong": ``storm-fit`` prints them as one line, no traceback."""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the config key and what it expects."""


class MissingPathError(ConfigError, FileNotFoundError):
    """A path in the config (shards, tokenizer, checkpoint, weights) that does not exist."""
