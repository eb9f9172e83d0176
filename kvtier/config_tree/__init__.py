"""One configuration tree built from flags, environment, a file and defaults (in that order
of precedence), with the source of every value. Neutral ground: kvstore and engine both
build their trees with it (see docs/configuration.md)."""
from kvtier.config_tree.file_source import ConfigFile, load_config_file
from kvtier.config_tree.flags import add_key_flags
from kvtier.config_tree.keys import ENV_PREFIX, Key, Source, keys_from_dataclass
from kvtier.config_tree.layers import (Setting, defaults_layer, env_layer, file_layer, flags_layer,
                                       kwargs_layer)
from kvtier.config_tree.logging_setup import LoggingConfig, configure_logging
from kvtier.config_tree.resolve import Resolved, build, merge
from kvtier.config_tree.show import render_tree

__all__ = ["ConfigFile", "ENV_PREFIX", "Key", "LoggingConfig", "Resolved", "Setting", "Source", "add_key_flags",
           "build", "configure_logging", "defaults_layer", "env_layer", "file_layer", "flags_layer",
           "keys_from_dataclass", "kwargs_layer", "load_config_file", "merge", "render_tree"]
