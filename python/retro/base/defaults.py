"""The defaults several stages share, in one place: the options dataclasses, the configuration and
the Python functions read them from here."""

IGNORE = -100  # the target id of a position that is not scored (the loss is 0 there)
