"""Sub-command modules of the ``dispersive`` CLI (layer L3): each has add_arguments and run."""
